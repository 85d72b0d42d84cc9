"""`kanmon service install`: the systemd unit, the `kanmon` system user, /etc/kanmon.

Role: what a package's post-install script would do, for installs from pip: create the
system user (useradd --system), /etc/kanmon/kanmon.toml (0640 root:kanmon, never
overwritten), the data directory (0700 kanmon:kanmon) and a `Type=notify` unit with
the sandboxing options of a hardened daemon. `--dry-run` prints every step and the
unit without doing anything; `--unit-dir`, `--config-dir` and `--no-user` let tests and
packagers put things elsewhere.

Trusts: the administrator running it (as root, except with --dry-run or paths of
their own). Never: overwrite an existing config file, or start the service itself
(the administrator decides when: `systemctl enable --now kanmon`).
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

import click

from kanmon.config import ConfigError, example_config_text, parse_config

UNIT_NAME = "kanmon.service"
# What PrivateTmp=yes and ProtectHome=yes hide from the service.
SANDBOX_HIDDEN = tuple(Path(p) for p in ("/tmp", "/var/tmp", "/home", "/root", "/run/user"))


def unit_text(exec_start: str, config_path: Path, data_dir: Path, user: str, group: str) -> str:
    """The unit file. Runs as `user` from the start (no root at all): systemd hands it
    CAP_NET_BIND_SERVICE for ports below 1024 and nothing else."""
    return f"""# kanmon mail gateway: written by `kanmon service install` (docs/operations.md)
[Unit]
Description=kanmon mail gateway
Documentation=https://github.com/kanmon/kanmon/blob/main/docs/operations.md
After=network-online.target
Wants=network-online.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={exec_start} serve -c {config_path}
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=5s
TimeoutStartSec=120s
TimeoutStopSec=90s
WatchdogSec=60s
User={user}
Group={group}
UMask=0077
AmbientCapabilities=CAP_NET_BIND_SERVICE
CapabilityBoundingSet=CAP_NET_BIND_SERVICE
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths={data_dir}
ProtectHome=yes
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
LimitNOFILE=65536

[Install]
WantedBy=multi-user.target
"""


def default_exec_start() -> str:
    """This interpreter running the package: right for a venv and a system install."""
    return f"{sys.executable} -m kanmon"


@click.group("service")
def service() -> None:
    """Install kanmon as a system service (systemd)."""


@service.command("install")
@click.option("--config", "source", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Config to install as CONFIG_DIR/kanmon.toml (default: the example config).")
@click.option("--config-dir", type=click.Path(file_okay=False), default="/etc/kanmon", show_default=True,
              help="Where the config goes.")
@click.option("--unit-dir", type=click.Path(file_okay=False), default="/etc/systemd/system", show_default=True,
              help="Where the unit file goes.")
@click.option("--user", "user_name", default="kanmon", show_default=True, help="The system user kanmon runs as.")
@click.option("--no-user", is_flag=True, help="Do not create the user (it exists, or a test).")
@click.option("--exec-start", default=None, help="The command that runs kanmon (default: this Python, -m kanmon).")
@click.option("--dry-run", is_flag=True, help="Print what would be done, change nothing.")
def install(source: str | None, config_dir: str, unit_dir: str, user_name: str, no_user: bool,
            exec_start: str | None, dry_run: bool) -> None:
    """Write the systemd unit, create the system user, the config and the data directory."""
    config_path = Path(config_dir) / "kanmon.toml"
    # An existing config is kept, so the unit's ReadWritePaths= and the data directory
    # follow that config, not --config FILE (which is then not installed at all).
    keep = config_path.exists()
    if keep:
        try:
            text = config_path.read_text()
        except OSError as e:
            click.echo(f"kanmon: cannot read the existing {config_path} ({e.strerror}); "
                       "run as root, or remove it to install another", err=True)
            sys.exit(2)
        origin = str(config_path)
    else:
        text = Path(source).read_text() if source else example_config_text()
        origin = source or "<example>"
    try:
        cfg = parse_config(text, origin)
    except ConfigError as e:
        for line in e.messages:
            click.echo(f"kanmon: {line}", err=True)
        if keep:
            click.echo(f"kanmon: the existing {config_path} is kept and must be valid: fix it "
                       "(kanmon config check), or remove it to install another", err=True)
        sys.exit(2)
    data_dir = Path(cfg.server.data_dir)
    if not data_dir.is_absolute():
        click.echo(f"kanmon: [server] data_dir {data_dir} in {origin} is relative; "
                   "a service needs an absolute path", err=True)
        sys.exit(2)
    unit_path = Path(unit_dir) / UNIT_NAME
    exists = _user_exists(user_name)
    group_name = grp.getgrgid(pwd.getpwnam(user_name).pw_gid).gr_name if exists else user_name
    unit = unit_text(exec_start or default_exec_start(), config_path, data_dir, user_name, group_name)
    program = Path((exec_start or default_exec_start()).split()[0])
    hidden = _sandbox_hidden(program)
    if hidden is not None:
        # The unit's PrivateTmp=yes and ProtectHome=yes hide these trees from the service.
        click.echo(f"kanmon: warning: {program} is under {hidden}, which the unit's sandbox hides "
                   "(PrivateTmp=yes, ProtectHome=yes): the service would not start. Install kanmon "
                   "elsewhere (e.g. python3 -m venv /opt/kanmon) or pass --exec-start.", err=True)
    from kanmon.admin.preflight import service_files  # noqa: PLC0415 - the one list of files serve reads

    for key, path in [("--config-dir", Path(config_dir)), ("server.data_dir", data_dir), *service_files(cfg)]:
        hidden = _sandbox_hidden(path)
        if hidden is not None:
            click.echo(f"kanmon: warning: {key} {path} is under {hidden}, which the unit's sandbox hides "
                       "(PrivateTmp=yes, ProtectHome=yes): the service would not find it. Move it "
                       "(e.g. under /etc/kanmon or /var/lib/kanmon).", err=True)

    def step(what: str) -> None:
        click.echo(("would: " if dry_run else "") + what)

    if not no_user and not exists:
        cmd = ["useradd", "--system", "--user-group", "--home-dir", str(data_dir), "--no-create-home",
               "--shell", "/usr/sbin/nologin", "--comment", "kanmon mail gateway", user_name]
        step("create the system user: " + " ".join(cmd))
        if not dry_run:
            subprocess.run(cmd, check=True)
            exists = True
    owner = _ids(user_name) if exists and os.geteuid() == 0 else None
    if keep:
        step(f"keep the existing {config_path} (its data_dir {data_dir} is used)")
        if source is not None and not _same_config(Path(source), config_path, text):
            click.echo(f"kanmon: {source} is not installed: {config_path} exists and is never "
                       "overwritten (edit it, or remove it and run this again)", err=True)
    else:
        step(f"write {config_path} (0640, readable by {user_name})")
        if not dry_run:
            # Modes set, not left to the umask: under an admin's umask 077 the service's
            # user could read neither the directory nor the file, and would not start.
            made_dir = not config_path.parent.exists()
            config_path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            if made_dir:
                os.chmod(config_path.parent, 0o750)
            fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            os.fchmod(fd, 0o640)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            if owner:
                os.chown(config_path.parent, 0, owner[1])
                os.chown(config_path, 0, owner[1])
    step(f"create {data_dir} (0700, owned by {user_name})")
    if not dry_run:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(data_dir, 0o700)
        if owner:
            os.chown(data_dir, *owner)
    step(f"write {unit_path}")
    if dry_run:
        click.echo(unit, nl=False)
    else:
        unit_path.parent.mkdir(parents=True, exist_ok=True)
        unit_path.write_text(unit)
        os.chmod(unit_path, 0o644)
    if shutil.which("systemctl") and Path(unit_dir) == Path("/etc/systemd/system"):
        click.echo("next: systemctl daemon-reload && systemctl enable --now kanmon")
    else:
        click.echo(f"next: load {unit_path} into your service manager, or run: "
                   f"{exec_start or default_exec_start()} serve -c {config_path}")


def _sandbox_hidden(path: Path) -> Path | None:
    """The tree of SANDBOX_HIDDEN that holds `path` (made absolute), or None."""
    path = Path(os.path.abspath(path))
    return next((d for d in SANDBOX_HIDDEN if d == path or d in path.parents), None)


def _same_config(source: Path, installed: Path, installed_text: str) -> bool:
    """--config names the installed file itself, or a copy of it."""
    try:
        return source.resolve() == installed.resolve() or source.read_text() == installed_text
    except OSError:
        return False


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def _ids(name: str) -> tuple[int, int]:
    pw = pwd.getpwnam(name)
    return pw.pw_uid, pw.pw_gid
