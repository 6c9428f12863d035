//! The `http` check: a GET that must answer `expect_status` (and contain
//! `body_contains`). Its manifest keys, probe and description live here.

use crate::manifest::reader::{Reader, Table};

/// The key that selects this kind, then the keys only it takes.
pub const KEY: &str = "http";
pub const EXTRA_KEYS: &[&str] = &["expect_status", "body_contains"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Http {
    pub url: String,
    pub expect_status: u16,
    pub body_contains: Option<String>,
}

/// Read the check from its manifest table; problems go to `r`.
pub(crate) fn parse(r: &mut Reader<'_>, t: &Table<'_, '_>) -> Option<Http> {
    let mut ok = true;
    let url = t.string(r, KEY);
    if let Some(u) = url.as_ref().filter(|u| u.value.starts_with('/')) {
        // A path: checked on an edge scope's slot, then through the edge.
        if reqwest::Url::parse(&format!("http://127.0.0.1{}", u.value)).is_err() {
            r.error(
                u.span.start,
                format!("health path {:?} is not a valid path", u.value),
            );
            ok = false;
        }
    } else if let Some(u) = &url {
        let rest = u
            .value
            .strip_prefix("http://")
            .or_else(|| u.value.strip_prefix("https://"));
        if rest.is_none_or(str::is_empty) {
            r.error(
                u.span.start,
                format!(
                    "health url {:?} must start with http:// or https://",
                    u.value
                ),
            );
            ok = false;
        } else if let Err(e) = reqwest::Url::parse(u.value) {
            // What the HTTP client would refuse at verification time.
            r.error(
                u.span.start,
                format!("health url {:?} is not a valid URL: {e}", u.value),
            );
            ok = false;
        }
    }
    let mut expect_status = 200;
    if let Some(s) = t.integer(r, "expect_status") {
        match u16::try_from(s.value) {
            Ok(code @ 100..=599) => expect_status = code,
            _ => {
                r.error(
                    s.span.start,
                    format!(
                        "expect_status {} is not an HTTP status code (100 to 599)",
                        s.value
                    ),
                );
                ok = false;
            }
        }
    } else if t.value("expect_status").is_some() {
        ok = false;
    }
    let body_contains = t.string(r, "body_contains");
    ok &= t.value("body_contains").is_none() || body_contains.is_some();
    let check = Http {
        url: url?.value.to_owned(),
        expect_status,
        body_contains: body_contains.map(|b| b.value.to_owned()),
    };
    ok.then_some(check)
}

impl Http {
    pub fn describe(&self) -> String {
        format!("http \"{}\"", self.url)
    }

    /// The URL to ask: a path is asked of `at` (an edge scope's slot, or
    /// the edge itself).
    pub fn url_at(&self, at: Option<std::net::SocketAddr>) -> String {
        match (self.url.starts_with('/'), at) {
            (true, Some(at)) => format!("http://{at}{}", self.url),
            _ => self.url.clone(),
        }
    }

    /// One attempt; `Err` says why it did not pass.
    pub async fn probe(
        &self,
        http: &reqwest::Client,
        at: Option<std::net::SocketAddr>,
    ) -> Result<(), String> {
        let response = http
            .get(self.url_at(at))
            .send()
            .await
            .map_err(|e| http_error(&e))?;
        let status = response.status().as_u16();
        if status != self.expect_status {
            return Err(format!("status {status} (expected {})", self.expect_status));
        }
        if let Some(needle) = &self.body_contains {
            let body = response.text().await.map_err(|e| http_error(&e))?;
            if !body.contains(needle.as_str()) {
                return Err(format!("body does not contain \"{needle}\""));
            }
        }
        Ok(())
    }
}

fn http_error(error: &reqwest::Error) -> String {
    if error.is_connect() {
        "connection refused".to_string()
    } else if error.is_timeout() {
        "timed out".to_string()
    } else {
        let mut text = error.to_string();
        let mut source = std::error::Error::source(error);
        while let Some(inner) = source {
            text = format!("{text}: {inner}");
            source = inner.source();
        }
        text
    }
}
