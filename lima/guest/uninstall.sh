#!/bin/sh
# Removes what install.sh installed and puts back what it changed (docker configs' credsStore,
# /etc/wsl.conf). Safe to run twice. POSIX sh (busybox works).
#
#   uninstall.sh [--root DIR]
set -eu
root=/
while [ $# -gt 0 ]; do
  case "$1" in
    --root) root=$2; shift 2 ;;
    *) echo "uninstall.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
R=${root%/}
STATE=$R/var/lib/finch-guest-agent

if [ "$R" = "" ] && [ -d /run/systemd/system ] && [ -f /etc/systemd/system/finch-guest-agent.service ]; then
  systemctl disable --now finch-guest-agent.service || true
fi

# Docker configs first: it takes the agent binary to put them back.
if [ -f "$STATE/docker-configs" ] && [ -x "$R/usr/local/bin/finch-guest-agent" ]; then
  while read -r rec d; do
    "$R/usr/local/bin/finch-guest-agent" docker-config restore-creds-store --file "$R$d/config.json" --record "$STATE/$rec"
  done < "$STATE/docker-configs"
  rm -f "$STATE/docker-configs"
fi

conf=$R/etc/wsl.conf
if [ -f "$STATE/wsl.conf.orig" ]; then
  cp -p "$STATE/wsl.conf.orig" "$conf"
  rm -f "$STATE/wsl.conf.orig"
elif [ -f "$STATE/wsl.conf.absent" ]; then
  rm -f "$conf" "$STATE/wsl.conf.absent"
fi

# The blocks install.sh --wsl-mounts wrote (WSL's automount comes back at the next start);
# a file it made that holds nothing else goes.
for f in "$R/etc/fstab" "$conf"; do
  if ! { [ -f "$f" ] && grep -q '^# finch-bridge: begin' "$f"; }; then continue; fi
  awk 'index($0, "# finch-bridge: begin") == 1 { skip = 1 } !skip { print } index($0, "# finch-bridge: end") == 1 { skip = 0 }' "$f" > "$f.finch-new"
  made=$STATE/$(basename "$f").made
  if [ -f "$made" ] && ! grep -q . "$f.finch-new"; then rm -f "$f" "$f.finch-new"; else chmod 0644 "$f.finch-new"; mv -f "$f.finch-new" "$f"; fi
  rm -f "$made"
done

# Finch's ~/.bashrc lines install.sh --wsl-mounts wrapped in a no-op here-document.
for rc in "$R"/root/.bashrc "$R"/home/*/.bashrc; do
  if [ -f "$rc" ] && grep -qx 'FINCH_BRIDGE_HARDENED' "$rc"; then
    owner=$(stat -c '%u:%g' "$rc")
    mode=$(stat -c '%a' "$rc")
    kept=$(grep -vx -e 'FINCH_BRIDGE_HARDENED' -e ": <<'FINCH_BRIDGE_HARDENED' # finch-bridge: setup finch --harden keeps this line of Finch from reading the host disk" "$rc" || true)
    # Finch writes the file without a final newline: keep it so.
    if [ -n "$(tail -c 1 "$rc")" ]; then printf '%s' "$kept"; else printf '%s\n' "$kept"; fi > "$rc.finch-new"
    chmod "$mode" "$rc.finch-new"
    chown "$owner" "$rc.finch-new"
    mv -f "$rc.finch-new" "$rc"
  fi
done

# containerd's hosts.toml files install.sh --scoped wrote.
if [ -f "$STATE/hosts-toml" ]; then
  while read -r r; do
    f=$R/etc/containerd/certs.d/$r/hosts.toml
    if [ -f "$f" ] && head -n 1 "$f" | grep -q '^# Written by the finch credential bridge'; then rm -f "$f"; fi
  done < "$STATE/hosts-toml"
  rm -f "$STATE/hosts-toml"
fi

# The links to the registry front's certificates install.sh --scoped made.
if [ -f "$STATE/front-certs" ]; then
  while read -r l; do
    for c in ca.crt client.cert client.key; do
      if [ -L "$R/etc/containers/certs.d/$l/$c" ]; then rm -f "$R/etc/containers/certs.d/$l/$c"; fi
    done
  done < "$STATE/front-certs"
  rm -f "$STATE/front-certs"
fi

rm -f "$R/etc/systemd/system/multi-user.target.wants/finch-guest-agent.service" \
  "$R/etc/systemd/system/finch-guest-agent.service" \
  "$R/etc/systemd/system/soci-snapshotter.service.d/finch-credentials.conf" \
  "$R/etc/systemd/system/soci-snapshotter.service.d/zz-finch-credential-bridge.conf" \
  "$R/etc/systemd/system/finch-guest-agent.service.d/finch-creds.conf" \
  "$R/etc/ssh/sshd_config.d/00-finch-credential-bridge.conf" \
  "$R/etc/containers/registries.conf.d/50-finch-credential-helpers.conf" \
  "$R/etc/containers/registries.conf.d/60-finch-bridge-scoped.conf" \
  "$R/etc/default/finch-guest-agent" \
  "$R/etc/finch-guest-agent/link.key" \
  "$R/usr/local/libexec/finch-guest-agent-start" \
  "$R/usr/local/bin/docker-credential-finchhost" \
  "$R/usr/local/libexec/finch-bridge/docker-credential-finchhost" \
  "$R/usr/local/bin/finch-guest-agent"
if [ "$R" = "" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload || true
  systemctl try-reload-or-restart ssh.service sshd.service 2>/dev/null || true
fi

# Directories install.sh created, deepest first, if empty.
if [ -f "$STATE/dirs" ]; then
  dirs=$(sort -r "$STATE/dirs")
  rm -f "$STATE/dirs"
  printf '%s\n' "$dirs" | while IFS= read -r d; do rmdir "$R$d" 2>/dev/null || true; done
fi
echo "finch credential bridge: guest side removed"
