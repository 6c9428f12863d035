//! Switching, verifying and stopping a scope owned by the `native` runtime:
//! unit files and drop-ins installed from the release, units restarted
//! through the user manager, then held to the settle window.

use std::path::Path;

use futures_util::future::try_join_all;

use super::Journal;
use crate::cli::short;
use crate::manifest::Scope;
use crate::runtime::systemd::Systemd;

/// Install the scope's unit files and drop-ins for `release`, reload, and
/// restart every unit. Each side effect is journaled first.
pub async fn switch(
    sd: &Systemd,
    scope: &Scope,
    release_dir: &Path,
    release: &str,
    journal: &mut Journal<'_>,
) -> Result<(), String> {
    let Some(native) = &scope.native else {
        return Err(format!("scope \"{}\" has no native section", scope.name));
    };
    let sd = &sd.with_job_timeout(scope.job_timeout);
    let short = short(release);
    for file in &native.unit_files {
        let src = release_dir.join(file);
        let unit = Path::new(file)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| file.clone());
        journal
            .step(
                format!("install {unit} from {short}"),
                sd.install_unit_file(&src, &unit),
            )
            .await
            .map_err(|e| e.to_string())?;
    }
    for unit in &native.units {
        journal
            .step(
                format!("point {unit} at release {short}"),
                sd.write_dropin(unit, release_dir, release),
            )
            .await
            .map_err(|e| e.to_string())?;
    }
    journal
        .step("reload the user manager".to_string(), sd.daemon_reload())
        .await
        .map_err(|e| e.to_string())?;
    // Unit files and drop-ins now name the new release; nothing restarted yet.
    crate::fault::point("after-stop");
    // systemd's own start timeout may be infinite; the rollout's is the
    // scope's job_timeout.
    for unit in &native.units {
        journal
            .step(format!("restart {unit} on {short}"), sd.restart(unit))
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Every unit stays up through the settle window and every health check
/// passes within the scope's timeout; both are watched at once, and the
/// first definite failure (a unit that went down) ends the wait.
pub async fn verify(
    sd: &Systemd,
    scope: &Scope,
    release_dir: &Path,
    http: &reqwest::Client,
) -> Result<(), String> {
    let units: &[String] = scope
        .native
        .as_ref()
        .map(|n| n.units.as_slice())
        .unwrap_or_default();
    let settle = async {
        try_join_all(units.iter().map(|unit| sd.settle(unit, scope.settle)))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let health = crate::health::wait_all(&scope.health, release_dir, scope.health_timeout, http);
    tokio::try_join!(settle, health).map(|_| ())
}

/// Stop every unit of the scope (first deploys that fail, removed scopes,
/// cutovers away from native).
pub async fn stop(sd: &Systemd, units: &[String], journal: &mut Journal<'_>) -> Result<(), String> {
    for unit in units {
        journal
            .step(format!("stop {unit}"), sd.stop(unit))
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}
