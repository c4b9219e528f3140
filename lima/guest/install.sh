#!/bin/sh
# Installs the guest side of the finch credential bridge into a VM (Lima, WSL2, any Linux VM).
# POSIX sh (busybox works). Idempotent: Lima runs provisioning at every boot, and a second run
# changes nothing. Every path is under --root, so it can be tried on a scratch directory.
# uninstall.sh undoes exactly what this did.
#
#   install.sh --bundle DIR [--root DIR] [--init systemd|wsl|none]
#              [--link-listen ENDPOINT] [--link-listen-non-loopback] [--link-allow-uid UID]... [--allow-uid UID]...
#              [--socket-group GROUP] [--docker-config DIR]... [--finch-creds-uid UID]
#              [--wsl-mounts FILE] [--scoped REGISTRY]... [--front-listen IP:PORT]
#              [--front-certs-dir DIR]
#
# The bundle holds finch-guest-agent, docker-credential-finchhost, SHA256SUMS (of both) and
# link.key (this VM's key, from `finch-host-agent key-path NAME` on the host). Nothing is
# changed unless every checksum matches. The key ends up in /etc/finch-guest-agent/link.key
# (0600, directory 0700) and is never printed.
#
# --finch-creds-uid UID (a Finch VM; UID is Finch's login user): the guest agent also answers
# Finch's credential socket, /run/user/UID/finch-creds.sock, from the bridge (what Finch's own
# /usr/bin/docker-credential-finchhost asks), and sshd refuses remote (reverse) socket
# forwards, so Finch's host credserver, which Lima reverse-forwards to that path, is never
# reachable in the VM. Lima's own forwards (guest to host: its agent, the link) still work.
#
# --scoped REGISTRY (host[:port], repeatable; docker.io for Docker Hub): the agent runs its
# registry front on --front-listen (default 127.0.0.1:6128) and containerd's
# /etc/containerd/certs.d/REGISTRY/hosts.toml names it as the registry's host, so nerdctl and
# ctr get short-lived tokens scoped by the host's pull/push policy instead of the password;
# /etc/containers/registries.conf.d/60-finch-bridge-scoped.conf makes it the registries'
# mirror for containers-image tools (pulls only). The front speaks TLS and serves only clients
# holding its client certificate, which the agent makes in --front-certs-dir (default
# /run/finch-guest-agent/front, root's): hosts.toml names it (ca, client), and
# /etc/containers/certs.d/IP:PORT/ links to it; a container on the VM's network (root or not)
# does not see it, so it gets no handshake.
# A hosts.toml the bridge did not write is never replaced (nothing is installed). The
# bundle's `scoped` file (the host agent writes the registries the VM's pull/push rules
# name) adds to the --scoped ones.
set -eu

root=/
bundle=
init=systemd
link_listen=
socket_group=
allow_args=
first_uid=
docker_configs=
finch_uid=
wsl_mounts=
scoped=
front_listen=
front_certs=/run/finch-guest-agent/front
while [ $# -gt 0 ]; do
  case "$1" in
    --root) root=$2; shift 2 ;;
    --bundle) bundle=$2; shift 2 ;;
    --init) init=$2; shift 2 ;;
    --link-listen) link_listen=$2; shift 2 ;;
    --link-allow-uid) allow_args="$allow_args --link-allow-uid $2"; shift 2 ;;
    --link-listen-non-loopback) allow_args="$allow_args --link-listen-non-loopback"; shift ;;
    --allow-uid) allow_args="$allow_args --allow-uid $2"; first_uid=${first_uid:-$2}; shift 2 ;;
    --socket-group) socket_group=$2; shift 2 ;;
    --docker-config) docker_configs="$docker_configs $2"; shift 2 ;;
    --finch-creds-uid) finch_uid=$2; shift 2 ;;
    --wsl-mounts) wsl_mounts=$2; shift 2 ;;
    --scoped) scoped="$scoped $2"; shift 2 ;;
    --front-listen) front_listen=$2; shift 2 ;;
    --front-certs-dir) front_certs=$2; shift 2 ;;
    *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -n "$bundle" ] || { echo "install.sh: --bundle DIR is required" >&2; exit 2; }
case "$init" in systemd|wsl|none) ;; *) echo "install.sh: --init is systemd, wsl or none" >&2; exit 2 ;; esac
case "$finch_uid" in ""|*[!0-9]*) [ -z "$finch_uid" ] || { echo "install.sh: --finch-creds-uid takes a number" >&2; exit 2; } ;; esac
case "$link_listen" in
  "") if [ "$init" = wsl ]; then link_listen=vsock://-1:6127; else link_listen=unix:///run/finch-guest-agent/link.sock; fi ;;
esac
# The registries the host's policy names for this VM (the bundle's `scoped`, one a line).
if [ -n "$bundle" ] && [ -f "$bundle/scoped" ]; then
  while IFS= read -r _r || [ -n "$_r" ]; do
    case " $scoped " in *" $_r "*) ;; *) [ -z "$_r" ] || scoped="$scoped $_r" ;; esac
  done < "$bundle/scoped"
fi
for _r in $scoped; do
  case "$_r" in
    *[!A-Za-z0-9.:-]*|:*|*:|*::*|*:*:*|.*|*..*) echo "install.sh: --scoped $_r: a registry is host[:port]" >&2; exit 2 ;;
  esac
done
if [ -n "$scoped" ]; then
  front_listen=${front_listen:-127.0.0.1:6128}
  case "$front_listen" in
    127.*:[0-9]*|"[::1]":[0-9]*) ;;
    *) echo "install.sh: --front-listen $front_listen: a loopback IP:PORT (127.0.0.1:6128)" >&2; exit 2 ;;
  esac
elif [ -n "$front_listen" ]; then
  echo "install.sh: --front-listen goes with --scoped" >&2; exit 2
fi
case "$front_certs" in
  /*) ;;
  *) echo "install.sh: --front-certs-dir $front_certs: an absolute path" >&2; exit 2 ;;
esac
case "$front_certs" in
  *[!A-Za-z0-9/._-]*) echo "install.sh: --front-certs-dir $front_certs: letters, digits and / . _ - only" >&2; exit 2 ;;
esac
asked_init=$init
R=${root%/}
STATE=$R/var/lib/finch-guest-agent

# 1. Check the bundle before touching anything.
for f in finch-guest-agent docker-credential-finchhost SHA256SUMS link.key; do
  [ -f "$bundle/$f" ] || { echo "install.sh: $bundle/$f is missing" >&2; exit 1; }
done
(cd "$bundle" && sha256sum -c SHA256SUMS >/dev/null 2>&1) || {
  echo "install.sh: the bundle's checksums do not match SHA256SUMS; nothing installed" >&2
  exit 1
}
for f in finch-guest-agent docker-credential-finchhost; do
  grep -q " \*\{0,1\}$f\$" "$bundle/SHA256SUMS" || { echo "install.sh: SHA256SUMS does not cover $f" >&2; exit 1; }
done
if [ -f "$bundle/scoped" ] && ! grep -q " \*\{0,1\}scoped\$" "$bundle/SHA256SUMS"; then
  echo "install.sh: SHA256SUMS does not cover scoped" >&2; exit 1
fi
# The agent refuses a key of fewer than 32 bytes (or more than 4096) at its first link: say
# it now, before anything changes.
_keylen=$(wc -c < "$bundle/link.key")
if [ "$_keylen" -lt 32 ] || [ "$_keylen" -gt 4096 ]; then
  echo "install.sh: $bundle/link.key is $_keylen bytes; a link key has 32 to 4096 (finch-host-agent key-export NAME writes one); nothing installed" >&2
  exit 1
fi
# The address families the unit allows: the helper socket's (unix) and the link's.
case "$link_listen" in
  unix://*) families="AF_UNIX" ;;
  vsock://*) families="AF_UNIX AF_VSOCK" ;;
  tcp://*) families="AF_UNIX AF_INET AF_INET6" ;;
  *) echo "install.sh: --link-listen $link_listen: use unix://PATH, vsock://CID:PORT or tcp://HOST:PORT" >&2; exit 2 ;;
esac
# The registry front listens on loopback TCP and reaches registries over the VM's network.
case "$families" in *AF_INET*) ;; *) [ -z "$scoped" ] || families="$families AF_INET AF_INET6" ;; esac
# containerd's hosts.toml per scoped registry: one the bridge did not write stays, and
# nothing is installed.
HOSTS_MARK='# Written by the finch credential bridge install.sh (--scoped); uninstall.sh removes it.'
hosts_toml() { echo "$R/etc/containerd/certs.d/$1/hosts.toml"; }
for _r in $scoped; do
  _f=$(hosts_toml "$_r")
  if [ -f "$_f" ] && [ "$(head -n 1 "$_f")" != "$HOSTS_MARK" ]; then
    echo "install.sh: $_f is not the bridge's; add the front as a host of $_r there yourself, or take it out; nothing installed" >&2
    exit 1
  fi
done
# containers-image finds the front's CA and client certificate in certs.d/IP:PORT/: links
# the bridge makes; anything else there stays, and nothing is installed.
FRONT_CERT_FILES="ca.crt client.cert client.key"
front_certs_d=$R/etc/containers/certs.d/$front_listen
if [ -n "$scoped" ]; then
  for _c in $FRONT_CERT_FILES; do
    _p=$front_certs_d/$_c
    { [ -e "$_p" ] || [ -L "$_p" ]; } || continue
    if [ -L "$_p" ] && { [ "$(readlink "$_p")" = "$front_certs/$_c" ] || grep -qxF "$front_listen" "$STATE/front-certs" 2>/dev/null; }; then
      continue
    fi
    echo "install.sh: $_p is not the bridge's; take it out; nothing installed" >&2
    exit 1
  done
fi
# The WSL mounts: each line is FSTAB's "SOURCE TARGET drvfs OPTIONS 0 0", the target under
# /mnt/, nothing else; wsl.conf may not already have an [automount] of its own.
BEGIN_MARK='# finch-bridge: begin'
END_MARK='# finch-bridge: end'
unmarked() { # FILE: its lines outside the bridge's block
  awk -v b="$BEGIN_MARK" -v e="$END_MARK" 'index($0, b) == 1 { skip = 1 } !skip { print } index($0, e) == 1 { skip = 0 }' "$1"
}
if [ -n "$wsl_mounts" ]; then
  [ "$init" = wsl ] || { echo "install.sh: --wsl-mounts goes with --init wsl" >&2; exit 2; }
  [ -f "$wsl_mounts" ] || { echo "install.sh: $wsl_mounts is missing" >&2; exit 1; }
  _bad=$(awk '/^[[:space:]]*(#|$)/ { next }
    NF != 6 || $3 != "drvfs" || $2 !~ /^\/mnt\/./ || $2 ~ /(^|\/)\.\.?(\/|$)/ || $5 != "0" || $6 != "0" { print NR; exit }' "$wsl_mounts")
  [ -z "$_bad" ] || { echo "install.sh: $wsl_mounts line $_bad is not a drvfs mount under /mnt/ (SOURCE /mnt/X/... drvfs OPTIONS 0 0); nothing installed" >&2; exit 1; }
  if [ -f "$R/etc/wsl.conf" ] && unmarked "$R/etc/wsl.conf" | grep -qi '^[[:space:]]*\[automount\]'; then
    echo "install.sh: $R/etc/wsl.conf already has an [automount] section; set enabled = false and mountFsTab = true there yourself, or take it out; nothing installed" >&2
    exit 1
  fi
fi
# WSL with systemd (Finch's distro has [boot] systemd=true): the agent is a systemd unit.
wsl_systemd=
if [ "$init" = wsl ] && [ -f "$R/etc/wsl.conf" ] &&
  awk '/^\[/ { boot = ($0 ~ /^\[boot\]/) } boot && /^[[:space:]]*systemd[[:space:]]*=[[:space:]]*true/ { found = 1 } END { exit !found }' "$R/etc/wsl.conf"; then
  wsl_systemd=1
  init=systemd
fi

# Directories this script creates are recorded, so uninstall.sh removes exactly those.
# (POSIX sh has no local variables: the helpers' names start with an underscore.)
mkdirs() { # DIR MODE
  _missing=
  _dir=$1
  while [ ! -d "$_dir" ]; do _missing="$_dir
$_missing"; _dir=$(dirname "$_dir"); done
  printf '%s' "$_missing" | while IFS= read -r _m; do
    [ -n "$_m" ] || continue
    mkdir -m "$2" "$_m"
    if [ -d "$STATE" ]; then printf '%s\n' "${_m#"$R"}" >> "$STATE/dirs"; else echo "${_m#"$R"}" >> "$R/.finch-dirs.tmp"; fi
  done
}
mkdirs "$STATE" 0755
if [ -f "$R/.finch-dirs.tmp" ]; then cat "$R/.finch-dirs.tmp" >> "$STATE/dirs"; rm -f "$R/.finch-dirs.tmp"; fi

# Writes stdin to FILE with MODE, only when the content differs (atomic rename); sets
# put_changed=1 when it wrote.
put_changed=
put() { # FILE MODE
  _tmp=$1.finch-new
  cat > "$_tmp"
  chmod "$2" "$_tmp"
  if [ -f "$1" ] && cmp -s "$_tmp" "$1"; then rm -f "$_tmp"; chmod "$2" "$1"; else mv -f "$_tmp" "$1"; put_changed=1; fi
}

# 2. Binaries. The helper is a link in /usr/local/bin to libexec: Finch on Windows links its
#    cred-helpers into /usr/local/bin from ~/.bashrc unless a link is there already
#    (`[ -L ... ] || sudo ln -s ...`), so a plain file would make that line fail, loudly, at
#    every finch command.
mkdirs "$R/usr/local/bin" 0755
put "$R/usr/local/bin/finch-guest-agent" 0755 < "$bundle/finch-guest-agent"
mkdirs "$R/usr/local/libexec/finch-bridge" 0755
put "$R/usr/local/libexec/finch-bridge/docker-credential-finchhost" 0755 < "$bundle/docker-credential-finchhost"
helper_link=../libexec/finch-bridge/docker-credential-finchhost
if [ "$(readlink "$R/usr/local/bin/docker-credential-finchhost" 2>/dev/null)" != "$helper_link" ]; then
  ln -sfn "$helper_link" "$R/usr/local/bin/docker-credential-finchhost"
fi

# 3. The key: root only.
mkdirs "$R/etc/finch-guest-agent" 0700
chmod 0700 "$R/etc/finch-guest-agent"
(umask 077 && put "$R/etc/finch-guest-agent/link.key" 0600 < "$bundle/link.key")

# 4. The agent's arguments. The helper socket goes to the first allowed user's primary group,
#    so that user can connect to it (mode 0660), unless --socket-group says otherwise.
if [ -z "$socket_group" ] && [ -n "$first_uid" ] && [ -f "$R/etc/passwd" ]; then
  socket_group=$(awk -F: -v u="$first_uid" '$3 == u { print $4; exit }' "$R/etc/passwd")
fi
args="--link-listen $link_listen --link-key-file /etc/finch-guest-agent/link.key$allow_args"
[ -z "$socket_group" ] || args="$args --socket-group $socket_group"
[ -z "$finch_uid" ] || args="$args --finch-creds-socket /run/user/$finch_uid/finch-creds.sock"
[ -z "$scoped" ] || args="$args --front-listen $front_listen --front-certs-dir $front_certs"
mkdirs "$R/etc/default" 0755
printf '# Written by the finch credential bridge install.sh.\nFINCH_GUEST_AGENT_ARGS="%s"\n' "$args" | put "$R/etc/default/finch-guest-agent" 0644

# 5. Start at boot.
first_docker_config=
for d in $docker_configs; do first_docker_config=${first_docker_config:-$d}; done
case "$init" in
  systemd)
    mkdirs "$R/etc/systemd/system/multi-user.target.wants" 0755
    sed "s/@FAMILIES@/$families/" <<'UNIT' | put "$R/etc/systemd/system/finch-guest-agent.service" 0644
# Written by the finch credential bridge install.sh; uninstall.sh removes it.
[Unit]
Description=finch credential bridge guest agent
Documentation=https://github.com/runfinch/finch-credential-bridge
After=local-fs.target
Before=containerd.service buildkit.service soci-snapshotter.service

[Service]
Type=simple
EnvironmentFile=/etc/default/finch-guest-agent
ExecStart=/usr/local/bin/finch-guest-agent serve $FINCH_GUEST_AGENT_ARGS
Restart=on-failure
RestartSec=1
RuntimeDirectory=finch-guest-agent
RuntimeDirectoryMode=0755
# The registry front's certificates live there: kept while the agent restarts or is stopped
# (until the VM reboots), so containerd, which reads them at every pull, always finds them
# and, with the front down, goes on to the registry itself.
RuntimeDirectoryPreserve=yes
CapabilityBoundingSet=CAP_CHOWN CAP_FOWNER CAP_DAC_READ_SEARCH
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictAddressFamilies=@FAMILIES@
RestrictNamespaces=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native

[Install]
WantedBy=multi-user.target
UNIT
    ln -sfn /etc/systemd/system/finch-guest-agent.service "$R/etc/systemd/system/multi-user.target.wants/finch-guest-agent.service"
    if [ -n "$finch_uid" ]; then
      # The agent listens in the user's runtime directory, a tmpfs logind mounts at login
      # (after the agent started): under ProtectSystem=strict or ProtectHome it would be
      # read-only in the agent's namespace, and the directory is the user's, mode 0700.
      mkdirs "$R/etc/systemd/system/finch-guest-agent.service.d" 0755
      put "$R/etc/systemd/system/finch-guest-agent.service.d/finch-creds.conf" 0644 <<'DROPIN'
# Written by the finch credential bridge install.sh (--finch-creds-uid).
[Service]
ProtectSystem=full
ProtectHome=no
InaccessiblePaths=-/home -/root
CapabilityBoundingSet=CAP_DAC_OVERRIDE
DROPIN
      mkdirs "$R/etc/ssh/sshd_config.d" 0755
      put_changed=
      put "$R/etc/ssh/sshd_config.d/00-finch-credential-bridge.conf" 0644 <<'SSHD'
# Written by the finch credential bridge install.sh (--finch-creds-uid); uninstall.sh removes it.
# Finch reverse-forwards its host credential server to /run/user/UID/finch-creds.sock, where
# any process of the VM's user (or root) could ask it for any registry, unchecked. The guest
# agent answers that path from the bridge instead; refusing remote socket forwards keeps the
# host server out of the VM. Local forwards (guest to host) still work.
AllowStreamLocalForwarding local
SSHD
      # Reloaded only when the file is new: at later boots sshd starts with it.
      if [ -n "$put_changed" ] && [ "$R" = "" ] && [ -d /run/systemd/system ]; then
        systemctl try-reload-or-restart ssh.service sshd.service 2>/dev/null || true
      fi
    fi
    if [ -n "$first_docker_config" ]; then
      # zz-: drop-ins apply in name order and the last DOCKER_CONFIG wins; Finch's own is
      # override.conf (runfinch/finch pkg/config/lima_config_applier.go).
      mkdirs "$R/etc/systemd/system/soci-snapshotter.service.d" 0755
      rm -f "$R/etc/systemd/system/soci-snapshotter.service.d/finch-credentials.conf"
      printf '# Written by the finch credential bridge install.sh.\n[Service]\nEnvironment=DOCKER_CONFIG=%s\n' "$first_docker_config" \
        | put "$R/etc/systemd/system/soci-snapshotter.service.d/zz-finch-credential-bridge.conf" 0644
    fi
    if [ "$R" = "" ] && [ -d /run/systemd/system ]; then
      systemctl daemon-reload
      systemctl restart finch-guest-agent.service
    fi
    ;;
  wsl)
    mkdirs "$R/usr/local/libexec" 0755
    put "$R/usr/local/libexec/finch-guest-agent-start" 0755 <<'START'
#!/bin/sh
# Started by WSL's [boot] command: runs the guest agent detached, logging to /var/log.
. /etc/default/finch-guest-agent
mkdir -p /run/finch-guest-agent
# shellcheck disable=SC2086
setsid /usr/local/bin/finch-guest-agent serve $FINCH_GUEST_AGENT_ARGS >>/var/log/finch-guest-agent.log 2>&1 < /dev/null &
START
    conf=$R/etc/wsl.conf
    line='command = "/usr/local/libexec/finch-guest-agent-start"'
    if [ -f "$conf" ] && grep -qF "$line" "$conf"; then
      :
    elif [ -f "$conf" ] && grep -q '^\[boot\]' "$conf"; then
      # Installed, but nothing would start it: a failure, not "installed".
      echo "install.sh: installed, but nothing starts the agent at boot: $conf already has a [boot] section; add this line to it, or set systemd = true there and run install.sh again:" >&2
      echo "  $line" >&2
      wsl_unstarted=1
    else
      if [ -f "$conf" ]; then cp -p "$conf" "$STATE/wsl.conf.orig"; else : > "$STATE/wsl.conf.absent"; fi
      { [ ! -f "$conf" ] || cat "$conf"; printf '\n[boot]\n%s\n' "$line"; } | put "$conf" 0644
    fi
    ;;
  none) ;;
esac

# 5b. WSL's mounts (--wsl-mounts), or none of the bridge's.
# Rewrites FILE with its lines outside the bridge's block, then the block from stdin (none
# when stdin is empty); a file the bridge made holding nothing else goes again.
put_block() { # FILE HEADER
  _body=$(cat)
  _rest=
  [ ! -f "$1" ] || _rest=$(unmarked "$1")
  if [ -z "$_body" ]; then
    [ -f "$1" ] && grep -q "^$BEGIN_MARK" "$1" || return 0
    if [ -z "$_rest" ] && [ -f "$STATE/$(basename "$1").made" ]; then rm -f "$1" "$STATE/$(basename "$1").made"; return 0; fi
    unmarked "$1" | put "$1" 0644
    return 0
  fi
  [ -f "$1" ] || : > "$STATE/$(basename "$1").made"
  { [ -z "$_rest" ] || printf '%s\n' "$_rest"; printf '%s %s\n%s\n%s\n' "$BEGIN_MARK" "$2" "$_body" "$END_MARK"; } | put "$1" 0644
}
# Finch's lines in a VM user's ~/.bashrc (runfinch/finch pkg/config/nerdctl_config_applier.go
# updateEnvironment) read the host's disk through wslpath: FINCH_DIR, AWS_DIR, DOCKER_CONFIG,
# /root/.aws, cred-helpers, ~/.finch. With only --wsl-mounts' directories mounted they would
# print errors at every `finch` command (and `ln -s` a .finch link into the working
# directory), so each is wrapped in a no-op here-document, kept verbatim: Finch adds a line
# only when the file does not contain it (addLineToBashrc), so it does not add them again.
# Without --wsl-mounts (and in uninstall.sh) the wrapping comes out.
HARDENED=FINCH_BRIDGE_HARDENED
finch_bashrc() { # FILE on|off
  _owner=$(stat -c '%u:%g' "$1")
  _mode=$(stat -c '%a' "$1")
  [ "$2" = on ] || grep -qx "$HARDENED" "$1" || return 0
  awk -v m="$HARDENED" -v on="$2" '
    BEGIN { open = ": <<'"'"'" m "'"'"' # finch-bridge: setup finch --harden keeps this line of Finch from reading the host disk" }
    $0 == open || $0 == m { next }
    { line = (n++ ? line "\n" : "") $0 }
    /\\$/ { next }
    { if (on == "on" && line ~ /(FINCH_DIR|AWS_DIR)/) print open "\n" line "\n" m; else print line; n = 0 }
    END { if (n) print line }' "$1" > "$1.finch-awk"
  # Finch writes the file without a final newline: keep it so.
  if [ -n "$(tail -c 1 "$1")" ]; then printf '%s' "$(cat "$1.finch-awk")"; else cat "$1.finch-awk"; fi | put "$1" "$_mode"
  rm -f "$1.finch-awk"
  chown "$_owner" "$1"
}
finch_bashrcs() { # on|off
  for _rc in "$R"/root/.bashrc "$R"/home/*/.bashrc; do
    # shellcheck disable=SC2016 # the text Finch writes, not an expansion
    if [ -f "$_rc" ] && grep -qF 'FINCH_DIR="$(/usr/bin/wslpath' "$_rc"; then finch_bashrc "$_rc" "$1"; fi
  done
}
if [ -n "$wsl_mounts" ]; then
  finch_bashrcs on
  grep -v '^[[:space:]]*\(#\|$\)' "$wsl_mounts" | put_block "$R/etc/fstab" "(setup finch --harden: only these Windows directories are mounted)"
  # Mount points, made here (mount -a makes none): fstab's octal escapes (\040 for a
  # space) undone through printf's \0NNN.
  awk '!/^[[:space:]]*(#|$)/ { print $2 }' "$wsl_mounts" | while IFS= read -r _target; do
    _target=$(printf '%b' "$(printf '%s' "$_target" | sed 's/\\\([0-7][0-7][0-7]\)/\\0\1/g')")
    mkdirs "$R$_target" 0755
  done
  printf '[automount]\nenabled = false\nmountFsTab = true\n' | put_block "$R/etc/wsl.conf" "(setup finch --harden: no drive is mounted whole)"
elif [ "$asked_init" = wsl ]; then
  finch_bashrcs off
  put_block "$R/etc/fstab" "" < /dev/null
  put_block "$R/etc/wsl.conf" "" < /dev/null
fi

# 6. Clients: docker config (nerdctl, BuildKit, SOCI) and containers-image tools.
for d in $docker_configs; do
  rec=creds-store-$(printf '%s' "$d" | sha256sum | cut -c1-16).json
  # A directory made in a user's home is that user's (Finch's .bashrc writes config.json in
  # ~/.finch-vm-config as the user; run before `vm init` made it, root's would break that).
  _made=; [ -d "$R$d" ] || _made=1
  mkdirs "$R$d" 0700
  if [ -n "$_made" ]; then
    _owner=$(stat -c '%u:%g' "$(dirname "$R$d")")
    [ "$_owner" = "0:0" ] || chown "$_owner" "$R$d"
  fi
  grep -qxF "$rec $d" "$STATE/docker-configs" 2>/dev/null || printf '%s %s\n' "$rec" "$d" >> "$STATE/docker-configs"
  "$R/usr/local/bin/finch-guest-agent" docker-config set-creds-store --file "$R$d/config.json" --record "$STATE/$rec"
done
mkdirs "$R/etc/containers/registries.conf.d" 0755
printf '# Written by the finch credential bridge install.sh.\n# finchhost alone: with containers-auth.json after it, a store the host refuses (or a link\n# that is down) would land in containers/auth.json in the runtime dir, in the VM.\ncredential-helpers = ["finchhost"]\n' \
  | put "$R/etc/containers/registries.conf.d/50-finch-credential-helpers.conf" 0644

# 7. Scoped registries: containerd (nerdctl, ctr) asks the front, which asks the host for
#    tokens. A registry no longer --scoped loses the hosts.toml the bridge wrote for it.
if [ -f "$STATE/hosts-toml" ]; then
  while read -r _r; do
    case " $scoped " in *" $_r "*) ;; *) rm -f "$(hosts_toml "$_r")" ;; esac
  done < "$STATE/hosts-toml"
  rm -f "$STATE/hosts-toml"
fi
for _r in $scoped; do
  _server=https://$_r
  [ "$_r" != docker.io ] || _server=https://registry-1.docker.io
  mkdirs "$R/etc/containerd/certs.d/$_r" 0755
  printf '%s\nserver = "%s"\n\n[host."https://%s/r/%s"]\n  capabilities = ["pull", "resolve", "push"]\n  ca = "%s/ca.crt"\n  client = [["%s/client.cert", "%s/client.key"]]\n' \
    "$HOSTS_MARK" "$_server" "$front_listen" "$_r" "$front_certs" "$front_certs" "$front_certs" \
    | put "$(hosts_toml "$_r")" 0644
  echo "$_r" >> "$STATE/hosts-toml"
done
# containers-image tools (podman, skopeo) pull the same registries through the front as a
# mirror: its /v2/m/NAME/ form, NAME the registry with ':' spelled '__'.
mirrors=$R/etc/containers/registries.conf.d/60-finch-bridge-scoped.conf
if [ -n "$scoped" ]; then
  {
    printf '%s\n# containers-image tools pull these registries through the registry front (a mirror: pulls only).\n' "$HOSTS_MARK"
    for _r in $scoped; do
      printf '\n[[registry]]\nprefix = "%s"\nlocation = "%s"\n\n[[registry.mirror]]\nlocation = "%s/m/%s"\n' \
        "$_r" "$_r" "$front_listen" "$(printf '%s' "$_r" | sed 's/:/__/g')"
    done
  } | put "$mirrors" 0644
else
  rm -f "$mirrors"
fi
# The front's certificates for containers-image: links into --front-certs-dir (the agent
# makes the files when it starts). Links of an earlier --front-listen go.
if [ -f "$STATE/front-certs" ]; then
  while read -r _l; do
    [ "$_l" = "$front_listen" ] && [ -n "$scoped" ] && continue
    for _c in $FRONT_CERT_FILES; do rm -f "$R/etc/containers/certs.d/$_l/$_c"; done
    rmdir "$R/etc/containers/certs.d/$_l" 2>/dev/null || true
  done < "$STATE/front-certs"
  rm -f "$STATE/front-certs"
fi
if [ -n "$scoped" ]; then
  mkdirs "$front_certs_d" 0755
  for _c in $FRONT_CERT_FILES; do ln -sfn "$front_certs/$_c" "$front_certs_d/$_c"; done
  echo "$front_listen" > "$STATE/front-certs"
fi
finch_note=
[ -z "$finch_uid" ] || finch_note=", Finch credential socket of uid $finch_uid"
[ -z "$scoped" ] || finch_note="$finch_note, scoped:$scoped"
[ -z "${wsl_unstarted:-}" ] || exit 1
[ -z "$wsl_systemd" ] || init="systemd, WSL's"
echo "finch credential bridge: guest side installed (init: $init, link: $link_listen$finch_note)"
