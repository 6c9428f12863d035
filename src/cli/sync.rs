//! `moorline sync`: wake the running agent to fetch now.

use crate::api::{self, Request, Response};
use crate::config::Config;

pub async fn run(config: &Config) -> u8 {
    match api::request(&config.state.dir, &Request::Sync).await {
        Ok(Response::Synced) => {
            super::out(&format!(
                "agent woken: fetching {} now\n",
                config.source.branch
            ));
            super::OK
        }
        Ok(other) => super::unexpected(&other),
        Err(e) => super::fail(e),
    }
}
