//! Switching, verifying and stopping a scope owned by the `native` runtime:
//! unit files and drop-ins installed from the release, units restarted
//! through the user manager, then held to the settle window.

use std::path::Path;

use super::Systemd;
use crate::journal::Journal;
use crate::manifest::Scope;
use crate::runtime::{Owner, RuntimeError};
use crate::source::short;

/// Install the scope's unit files and drop-ins for `release`, reload, and
/// restart every unit. Each side effect is journaled first.
pub async fn switch(
    sd: &Systemd,
    scope: &Scope,
    release_dir: &Path,
    release: &str,
    journal: &mut Journal<'_>,
) -> Result<(), RuntimeError> {
    let Some(native) = &scope.native else {
        return Err(RuntimeError::NoForm {
            scope: scope.name.clone(),
            owner: Owner::Native,
        });
    };
    let sd = &sd.with_job_timeout(scope.job_timeout);
    install_unit_files(sd, &native.unit_files, release_dir, release, journal).await?;
    point_and_restart(sd, &native.units, release_dir, release, &[], journal).await
}

/// Point `units` at `release` (drop-ins with `env` besides the release and
/// commit), reload, and restart them, each step journaled first.
pub async fn point_and_restart(
    sd: &Systemd,
    units: &[String],
    release_dir: &Path,
    release: &str,
    env: &[(&str, String)],
    journal: &mut Journal<'_>,
) -> Result<(), RuntimeError> {
    let short = short(release);
    for unit in units {
        journal
            .step(
                format!("point {unit} at release {short}"),
                sd.write_dropin(unit, release_dir, release, env),
            )
            .await
            .map_err(RuntimeError::from)?;
    }
    journal
        .step("reload the user manager".to_string(), sd.daemon_reload())
        .await
        .map_err(RuntimeError::from)?;
    // Unit files and drop-ins now name the new release; nothing restarted yet.
    crate::fault::point("after-stop");
    // systemd's own start timeout may be infinite; the rollout's is the
    // scope's job_timeout.
    for unit in units {
        journal
            .step(format!("restart {unit} on {short}"), sd.restart(unit))
            .await
            .map_err(RuntimeError::from)?;
    }
    Ok(())
}

/// Install the scope's `unit_files` from the release into the unit directory.
pub async fn install_unit_files(
    sd: &Systemd,
    files: &[String],
    release_dir: &Path,
    release: &str,
    journal: &mut Journal<'_>,
) -> Result<(), RuntimeError> {
    for file in files {
        let src = release_dir.join(file);
        let unit = Path::new(file)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| file.clone());
        journal
            .step(
                format!("install {unit} from {}", short(release)),
                sd.install_unit_file(&src, &unit),
            )
            .await
            .map_err(RuntimeError::from)?;
    }
    Ok(())
}

/// Stop every unit of the scope (first deploys that fail, removed scopes,
/// cutovers away from native).
pub async fn stop(
    sd: &Systemd,
    units: &[String],
    journal: &mut Journal<'_>,
) -> Result<(), RuntimeError> {
    journal
        .each(units, |u| format!("stop {u}"), |u| sd.stop(u))
        .await
        .map_err(RuntimeError::from)
}

/// Start units again (undoing a cutover away from native).
pub async fn start(
    sd: &Systemd,
    units: &[String],
    journal: &mut Journal<'_>,
) -> Result<(), RuntimeError> {
    journal
        .each(units, |u| format!("start {u}"), |u| sd.start(u))
        .await
        .map_err(RuntimeError::from)
}

/// Take units out of service for good: stopped, their drop-ins and the unit
/// files `installed_by` (the scope as it ran) installed removed, reloaded.
pub async fn retire(
    sd: &Systemd,
    installed_by: Option<&Scope>,
    units: &[String],
    journal: &mut Journal<'_>,
) -> Result<(), RuntimeError> {
    let installed: Vec<String> = installed_by
        .and_then(|s| s.native.as_ref())
        .map(|n| {
            n.unit_files
                .iter()
                .filter_map(|f| Path::new(f).file_name())
                .map(|f| f.to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    stop(sd, units, journal).await?;
    for unit in units {
        journal
            .step(
                format!("remove the drop-in of {unit}"),
                sd.remove_dropin(unit),
            )
            .await
            .map_err(RuntimeError::from)?;
        if installed.contains(unit) {
            journal
                .step(
                    format!("remove the unit file {unit}"),
                    sd.remove_unit_file(unit),
                )
                .await
                .map_err(RuntimeError::from)?;
        }
    }
    journal
        .step("reload the user manager".to_string(), sd.daemon_reload())
        .await
        .map_err(RuntimeError::from)
}

fn is_up(active_state: &str) -> bool {
    matches!(
        active_state,
        "active" | "activating" | "reloading" | "deactivating"
    )
}

/// The scope's units that are up (the audit's foreign members when docker
/// owns the scope).
pub async fn running(sd: &Systemd, scope: &Scope) -> Result<Vec<String>, RuntimeError> {
    let mut found = Vec::new();
    for unit in scope.members_on(crate::runtime::Owner::Native) {
        let state = sd.unit_state(&unit).await.map_err(RuntimeError::from)?;
        if is_up(&state.active_state) {
            found.push(unit);
        }
    }
    Ok(found)
}

/// Units that are down, or whose drop-in names another release than `release`.
pub async fn drift(
    sd: &Systemd,
    scope: &Scope,
    release: &str,
) -> Result<Vec<String>, RuntimeError> {
    let units = scope.native.as_ref().map(|n| n.units.as_slice());
    drift_of(sd, units.unwrap_or_default(), release).await
}

/// Of `units`, those that are down or whose drop-in names another release.
pub async fn drift_of(
    sd: &Systemd,
    units: &[String],
    release: &str,
) -> Result<Vec<String>, RuntimeError> {
    let mut found = Vec::new();
    for unit in units {
        let state = sd.unit_state(unit).await.map_err(RuntimeError::from)?;
        if !is_up(&state.active_state) {
            found.push(format!(
                "{unit} is {} ({})",
                state.active_state, state.sub_state
            ));
            continue;
        }
        if let Ok(Some((_, commit))) = sd.read_dropin(unit).await
            && commit != release
        {
            found.push(format!(
                "{unit} runs release {} but {} was recorded",
                short(&commit),
                short(release)
            ));
        }
    }
    Ok(found)
}

/// What `status` shows for one unit.
pub async fn member_state(sd: &Systemd, unit: &str) -> crate::runtime::MemberState {
    use crate::runtime::MemberState;
    match sd.unit_state(unit).await {
        Ok(u) if u.load_state == "not-found" => MemberState::Down("not-found".to_string()),
        Ok(u) if u.active_state == "active" => {
            MemberState::Up(format!("{} ({})", u.active_state, u.sub_state))
        }
        Ok(u) => MemberState::Down(format!("{} ({})", u.active_state, u.sub_state)),
        Err(e) if e.is_transient() => MemberState::Unknown(format!("unknown: {e}")),
        Err(e) => MemberState::Down(format!("unknown: {e}")),
    }
}
