//! The `tcp` check: a connection to `host:port` must be accepted. Its
//! manifest key, probe and description live here.

use crate::manifest::reader::{Reader, Table};

pub const KEY: &str = "tcp";
pub const EXTRA_KEYS: &[&str] = &[];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tcp {
    pub addr: String,
}

pub(crate) fn parse(r: &mut Reader<'_>, t: &Table<'_, '_>) -> Option<Tcp> {
    let addr = t.string(r, KEY)?;
    let valid = addr
        .value
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if !valid {
        r.error(
            addr.span.start,
            format!(
                "tcp address {:?} must be \"host:port\", e.g. \"127.0.0.1:4000\"",
                addr.value
            ),
        );
        return None;
    }
    Some(Tcp {
        addr: addr.value.to_owned(),
    })
}

impl Tcp {
    pub fn describe(&self) -> String {
        format!("tcp \"{}\"", self.addr)
    }

    pub async fn probe(&self) -> Result<(), String> {
        tokio::net::TcpStream::connect(self.addr.as_str())
            .await
            .map(drop)
            .map_err(|e| format!("connect failed: {e}"))
    }
}
