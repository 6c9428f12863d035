//! Helpers shared by the integration tests: real components to run moorline against.

pub mod user_manager;
