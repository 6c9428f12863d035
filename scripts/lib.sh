# Shared by scripts/demo and scripts/bench: a private systemd user manager
# and an example repository on this machine.
# Source it; it defines functions only.

# start_user_manager DIR: a user manager whose runtime and config dirs live
# under DIR, in a cgroup of its own. Exports XDG_RUNTIME_DIR, XDG_CONFIG_HOME,
# DBUS_SESSION_BUS_ADDRESS; sets UM_PID and UM_CGROUPS.
start_user_manager() {
  local base=$1
  mkdir -p /run/systemd/system 2>/dev/null || true
  export XDG_RUNTIME_DIR="$base/runtime" XDG_CONFIG_HOME="$base/config"
  mkdir -p "$XDG_RUNTIME_DIR" "$XDG_CONFIG_HOME/systemd/user"
  chmod 0700 "$XDG_RUNTIME_DIR"
  export DBUS_SESSION_BUS_ADDRESS="unix:path=$XDG_RUNTIME_DIR/bus"
  local cg="moorline-demo-$$"
  if [ -f /sys/fs/cgroup/cgroup.controllers ]; then UM_CGROUPS="/sys/fs/cgroup/$cg"
  else UM_CGROUPS="/sys/fs/cgroup/systemd/$cg /sys/fs/cgroup/unified/$cg"; fi
  for d in $UM_CGROUPS; do mkdir -p "$d"; done
  ( for d in $UM_CGROUPS; do echo $BASHPID >"$d/cgroup.procs"; done
    exec setsid env SYSTEMD_LOG_TARGET=console /lib/systemd/systemd --user ) >"$base/manager.log" 2>&1 &
  UM_PID=$!
  local i
  for i in $(seq 1 200); do
    case "$(systemctl --user is-system-running 2>/dev/null)" in running|degraded) return 0;; esac
    sleep 0.1
  done
  echo "the user manager did not come up; its log:" >&2; cat "$base/manager.log" >&2; return 1
}

stop_user_manager() {
  [ -n "${UM_PID:-}" ] || return 0
  kill -TERM "$UM_PID" 2>/dev/null || true
  local i d p
  for i in $(seq 1 100); do kill -0 "$UM_PID" 2>/dev/null || break; sleep 0.1; done
  # Whatever is left anywhere below the manager's cgroups (its services
  # live in nested cgroups) is killed, then the cgroups removed bottom-up.
  for d in $UM_CGROUPS; do
    [ -d "$d" ] || continue
    for p in $(find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null); do kill -KILL "$p" 2>/dev/null || true; done
  done
  for d in $UM_CGROUPS; do
    [ -d "$d" ] || continue
    for i in $(seq 1 50); do
      find "$d" -depth -type d -exec rmdir {} + 2>/dev/null || true
      [ -d "$d" ] || break
      sleep 0.1
    done
  done
  UM_PID=
}

# make_example_repo DIR WEB_PORT API_PORT: DIR/app.git (bare) and DIR/work (a clone
# with deploy-manifests/webapp committed and pushed), ports rewritten.
make_example_repo() {
  local dir=$1 web=$2 api=$3 here
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  mkdir -p "$dir/work"
  cp -R "$here/deploy-manifests/webapp/." "$dir/work/"
  sed -i "s/18080/$web/g; s/14000/$api/g" "$dir/work/deploy/moorline.toml" "$dir/work/deploy/units/"*.service
  git init -q --bare -b main "$dir/app.git"
  git -C "$dir/work" init -q -b main
  git -C "$dir/work" add -A
  git -C "$dir/work" -c user.name=demo -c user.email=demo@example.invalid commit -q -m "initial import"
  git -C "$dir/work" remote add origin "$dir/app.git"
  git -C "$dir/work" push -q origin main
}

# wait_until SECONDS COMMAND...: run COMMAND every 20 ms until it succeeds.
wait_until() {
  local limit=$1; shift
  local deadline=$(( $(date +%s%N) + limit * 1000000000 ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s%N)" -lt "$deadline" ] || return 1
    sleep 0.02
  done
}
