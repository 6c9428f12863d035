//! The dashboard: one page, a stylesheet and a script, compiled into the
//! binary (no CDN, nothing fetched at run time). The script reads the JSON
//! views of `/api/*` and redraws the tables in place every few seconds.

const INDEX: &str = include_str!("assets/index.html");
const STYLE: &str = include_str!("assets/style.css");
const SCRIPT: &str = include_str!("assets/app.js");

/// The asset at `path`: its content type and body.
pub fn asset(path: &str) -> Option<(&'static str, &'static str)> {
    match path {
        "/" | "/index.html" => Some(("text/html; charset=utf-8", INDEX)),
        "/style.css" => Some(("text/css; charset=utf-8", STYLE)),
        "/app.js" => Some(("text/javascript; charset=utf-8", SCRIPT)),
        _ => None,
    }
}
