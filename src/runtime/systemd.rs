//! systemd user units over D-Bus.
