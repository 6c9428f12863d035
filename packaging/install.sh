#!/bin/sh
# Install moorline for the current user: the binary in ~/.local/bin and the
# user unit in ~/.config/systemd/user. The host config is written by
# `moorline init` (config/config.toml is an annotated example). Run from a
# checkout after `cargo build --release`,
# or pass the binary: packaging/install.sh path/to/moorline
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${1:-"$here/target/release/moorline"}
[ -x "$bin" ] || { echo "install: no moorline binary at $bin (cargo build --release first)" >&2; exit 2; }
config_home=${XDG_CONFIG_HOME:-$HOME/.config}

install -d -m 0755 "$HOME/.local/bin" "$config_home/systemd/user"
install -d -m 0700 "$config_home/moorline" "${XDG_DATA_HOME:-$HOME/.local/share}/moorline"
install -m 0755 "$bin" "$HOME/.local/bin/moorline"
sed "s|^ExecStart=/usr/bin/moorline|ExecStart=$HOME/.local/bin/moorline|" "$here/units/moorline.service" \
  > "$config_home/systemd/user/moorline.service"
chmod 0644 "$config_home/systemd/user/moorline.service"
if [ -e "$config_home/moorline/config.toml" ]; then
  echo "kept the existing $config_home/moorline/config.toml"
  first=""
else
  first="  moorline init --url URL --branch main   # checks the source, writes the config
"
fi

cat <<MSG
installed moorline to $HOME/.local/bin/moorline and its user unit.

Next:
${first}  systemctl --user daemon-reload
  systemctl --user enable --now moorline
  moorline status

User units stop when you log out unless lingering is on. On a server, run once:
  sudo loginctl enable-linger $(id -un)
so the agent (and the units it deploys) run without a login session and start at boot.
MSG
