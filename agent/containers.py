"""The worker's container engine: docker where the worker has it, podman otherwise.

What LAVA's ``docker:`` keys need on a worker (``deploy: postprocess: docker``, ``boot: method: qemu``
with ``docker``, ``test: docker``), behind one small interface:

- :func:`engine_for` picks the engine the worker's dispatcher configuration names
  (``container_engine: docker|podman``) or, when it names none, docker where its daemon answers and
  podman otherwise. :meth:`Engine.problem` says, for validation, what is missing (the program, a
  daemon that does not answer, storage that does not work).
- :meth:`Engine.image_problem` says whether a job's image can be used: present on the worker, or
  pullable from a registry the worker reaches. Nothing is ever pulled implicitly from a registry the
  worker cannot reach; :meth:`Engine.prepare` pulls (LAVA's ``local: false``) only where it can.
  Image names are read as docker reads them (``debian`` is ``docker.io/library/debian:latest``).
- :class:`ContainerSpec` is one container of a job: its name is ``pumice-<job id>-<role>-<random>``,
  it gets the job's scratch directory only (bind-mounted at the same path), the devices and network
  asked for, and a run timeout (podman's conmon kills it then, even if pumice-run was killed).
  :meth:`Engine.run_argv` is the command line for a console (``--interactive --tty``: the container's
  stdio is a pty that :class:`agent.connections.console.Console` drives like QEMU's own);
  :meth:`Engine.run` runs a command to its end within a deadline, killing a container that hangs.
- :meth:`Engine.remove` removes a container at the end of the job; :func:`sweep` removes every
  ``pumice-<job id>-*`` container a dead runner left (the agent daemon calls it, as it sweeps the
  job's scratch directories).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.errors import InfrastructureError, JobTimeout
from agent.timeout import Deadline

#: the engines Pumice drives; ``container_engine`` in the dispatcher configuration names one
ENGINES = ("docker", "podman")
#: the dispatcher configuration key
CONFIG_KEY = "container_engine"
#: how long a call to the engine that does not run a job's container may take (info, inspect, rm)
ENGINE_CALL_TIMEOUT = 60.0
#: how long the registry check waits for a TCP connection
REGISTRY_CONNECT_TIMEOUT = 3.0
#: the registry of names without one, as docker reads them
DEFAULT_REGISTRY = "docker.io"
#: the host docker.io's images are pulled from
DOCKER_HUB = "registry-1.docker.io"
#: the exit status of ``docker run`` / ``podman run`` when the engine itself failed (no such image,
#: a bad option, a runtime error): not the command's
ENGINE_ERROR = 125


def container_prefix(job_id: object) -> str:
    """The name prefix of every container of job ``job_id``: ``pumice-<job id>-``."""
    return f"pumice-{int(job_id)}-"


def qualified(image: str) -> str:
    """``image`` as docker reads it: with its registry (``docker.io`` by default), ``library/`` for
    docker.io's official images and a tag (``latest``) unless it has a tag or a digest.

    ``debian`` -> ``docker.io/library/debian:latest``; ``kernelci/qemu`` ->
    ``docker.io/kernelci/qemu:latest``; ``ghcr.io/a/b:c`` stays as it is."""
    name = image.strip()
    first, _, rest = name.partition("/")
    if not rest or not ("." in first or ":" in first or first == "localhost"):
        registry, path = DEFAULT_REGISTRY, name
    else:
        registry, path = first, rest
    if registry == DEFAULT_REGISTRY and "/" not in path:
        path = f"library/{path}"
    last = path.rsplit("/", 1)[-1]
    if "@" not in last and ":" not in last:
        path += ":latest"
    return f"{registry}/{path}"


def registry_of(image: str) -> str:
    """The registry host (``host[:port]``) an image would be pulled from."""
    return qualified(image).split("/", 1)[0]


def image_problem_in_name(image: object) -> str | None:
    """What is wrong with an image name as a job wrote it (None: nothing)."""
    if not isinstance(image, str) or not image.strip():
        return f"an image name must be a non-empty string, got {image!r}"
    if any(char.isspace() for char in image.strip()) or image.strip().startswith("-"):
        return f"{image!r} is not an image name"
    return None


@dataclass
class ContainerSpec:
    """One container of a job. ``role`` says what it is for (``qemu``, ``postprocess``, ``test``)
    and goes into its name, ``pumice-<job id>-<role>-<random>``."""

    image: str
    job_id: int
    role: str
    #: the job's scratch directory: the only host directory the container sees (at the same path)
    scratch: Path | None = None
    #: host devices passed in (``/dev/kvm``); LAVA's ``skip_missing``: absent ones are left out
    devices: Sequence[str] = ()
    #: ``--network``: ``host``, ``none``, ``container:NAME``, podman's ``ns:/run/netns/NAME``, ...
    network: str | None = None
    environment: Mapping[str, str] = field(default_factory=dict)
    workdir: Path | None = None
    hostname: str | None = None
    #: seconds the container may run at most (podman kills it then by itself; both engines are
    #: killed by :meth:`Engine.run` at its deadline)
    timeout: float | None = None
    #: more ``run`` options, engine-specific (from the device's configuration, never the job's)
    options: Sequence[str] = ()
    name: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            role = "".join(c if c.isalnum() or c in "-_." else "-" for c in self.role) or "container"
            self.name = f"{container_prefix(self.job_id)}{role}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class RunResult:
    """What a container run to its end left: its exit status and output (stdout and stderr)."""

    name: str
    returncode: int
    output: str
    seconds: float


@dataclass(frozen=True)
class Engine:
    """One container engine on this worker: ``docker`` or ``podman`` (the program it runs)."""

    name: str
    program: str = ""
    env: Mapping[str, str] | None = None

    @property
    def argv0(self) -> str:
        return self.program or self.name

    # -- plain calls ---------------------------------------------------------------------------------
    def call(self, *args: str, timeout: float = ENGINE_CALL_TIMEOUT) -> subprocess.CompletedProcess:
        """``ENGINE ARGS`` to its end (an engine that cannot run is an InfrastructureError)."""
        from agent.process import die_with_parent

        try:
            return subprocess.run([self.argv0, *args], capture_output=True, text=True, errors="replace",
                                  timeout=timeout, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent,
                                  env=dict(self.env) if self.env is not None else None)
        except FileNotFoundError:
            raise InfrastructureError(self.missing()) from None
        except subprocess.TimeoutExpired:
            raise InfrastructureError(f"{self.name} {args[0]} did not answer within {timeout:.0f} s") from None

    def missing(self) -> str:
        return (f"the worker's container engine {self.name} is not installed (no {self.argv0!r} in PATH); "
                f"install it or set {CONFIG_KEY} in the worker's dispatcher configuration")

    def problem(self) -> str | None:
        """Why this engine cannot run containers here (None: it can): not installed, its daemon
        does not answer, its storage or runtime is broken. For validation messages."""
        if not shutil.which(self.argv0):
            return self.missing()
        try:
            done = self.call("info", "--format", "{{json .}}")
        except InfrastructureError as exc:
            return str(exc)
        if done.returncode != 0:
            detail = _last_line(done.stderr or done.stdout)
            return f"the worker's container engine {self.name} does not work: {detail}"
        return None

    # -- images --------------------------------------------------------------------------------------
    def has_image(self, image: str) -> bool:
        """True when ``image`` is in the engine's local storage."""
        return self.call("image", "inspect", "--format", "{{.Id}}", qualified(image)).returncode == 0

    def image_problem(self, image: str, local: bool = False) -> str | None:
        """Why ``image`` cannot be used by a job (None: it can). ``local`` is LAVA's ``local: true``:
        the image must be on the worker. Otherwise it must be on the worker or its registry must be
        reachable from it, to be pulled before use."""
        wrong = image_problem_in_name(image)
        if wrong:
            return wrong
        if self.has_image(image):
            return None
        if local:
            return (f"image {image!r} ({qualified(image)}) is not on this worker and the job says "
                    f"local: true; build or load it with {self.name} on the worker")
        unreachable = registry_unreachable(registry_of(image))
        if unreachable:
            return (f"image {image!r} ({qualified(image)}) is not on this worker and cannot be pulled: "
                    f"{unreachable}; build or load it with {self.name} on the worker")
        return None

    def prepare(self, image: str, local: bool, deadline: Deadline,
                log: Callable[[str], None] = lambda line: None) -> None:
        """Make ``image`` ready before a run. ``local: true``: it must be on the worker. Otherwise it
        is pulled (as LAVA does) from its registry when the worker reaches it; an image on the worker
        whose registry is out of reach is used as it is, which is logged."""
        present = self.has_image(image)
        if local:
            if not present:
                raise InfrastructureError(self.image_problem(image, local=True) or f"image {image!r} is missing")
            log(f"image {image} is on the worker (local: true)")
            return
        unreachable = registry_unreachable(registry_of(image))
        if unreachable:
            if not present:
                raise InfrastructureError(f"image {image!r} ({qualified(image)}) is not on this worker and cannot "
                                          f"be pulled: {unreachable}")
            log(f"image {image}: not pulled ({unreachable}); using the copy on the worker")
            return
        log(f"pulling image {qualified(image)}")
        done = self.call("pull", qualified(image), timeout=max(deadline.remaining(), 1.0))
        if done.returncode != 0:
            detail = _last_line(done.stderr or done.stdout)
            if not present:
                raise InfrastructureError(f"cannot pull image {image!r} ({qualified(image)}): {detail}")
            log(f"image {image}: the pull failed ({detail}); using the copy on the worker")

    # -- containers ----------------------------------------------------------------------------------
    def run_options(self, spec: ContainerSpec) -> list[str]:
        """``run`` options of ``spec``: removed when it ends, an init as PID 1 (signals, zombies),
        never pulled, the scratch directory only, devices, network, environment."""
        options = ["--rm", "--init", "--pull=never", f"--name={spec.name}",
                   "--label=org.pumice.job=" + str(int(spec.job_id))]
        if self.name == "podman" and spec.timeout:
            options.append(f"--timeout={max(1, int(spec.timeout + 0.999))}")
        if spec.scratch is not None:
            options.append(f"--mount=type=bind,source={spec.scratch},destination={spec.scratch}")
        for device in spec.devices:
            if os.path.exists(device):
                options.append(f"--device={device}")
        if spec.network:
            options.append(f"--network={spec.network}")
        if spec.hostname:
            options.append(f"--hostname={spec.hostname}")
        if spec.workdir is not None:
            options.append(f"--workdir={spec.workdir}")
        for key, value in spec.environment.items():
            options.append(f"--env={key}={value}")
        return [*options, *spec.options]

    def run_argv(self, spec: ContainerSpec, command: Sequence[str], console: bool = True) -> list[str]:
        """The command line that runs ``command`` in ``spec``'s container. ``console``: its stdio
        is a terminal (``--interactive --tty``), for pexpect to drive through a pty as it drives a
        QEMU on the worker, and the engine's detach keys are off (a board's bytes never detach)."""
        argv = [self.argv0, "run", *self.run_options(spec)]
        if console:
            argv[2:2] = ["--interactive", "--tty", "--detach-keys="]
        return [*argv, qualified(spec.image), *command]

    def run(self, spec: ContainerSpec, command: Sequence[str], deadline: Deadline,
            on_line: Callable[[str], None] = lambda line: None, max_output: int = 1 << 20) -> RunResult:
        """Run ``command`` in ``spec``'s container to its end, each output line to ``on_line``; keep
        at most ``max_output`` characters of output. A container still running at the deadline (or
        ``spec.timeout``) is killed and removed: JobTimeout naming the image and the command."""
        import selectors

        from agent.process import die_with_parent

        limit = deadline.remaining() if spec.timeout is None else deadline.within(spec.timeout)
        argv = self.run_argv(spec, command, console=False)
        start = time.monotonic()
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
                                    env=dict(self.env) if self.env is not None else None)
        except FileNotFoundError:
            raise InfrastructureError(self.missing()) from None
        output: list[str] = []
        kept = 0
        partial = b""
        timed_out = False
        end = start + limit
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(proc.stdout, selectors.EVENT_READ)
                while True:
                    left = end - time.monotonic()
                    if left <= 0:
                        timed_out = True
                        break
                    if not sel.select(left):
                        continue
                    data = os.read(proc.stdout.fileno(), 65536)
                    if not data:
                        break
                    *lines, partial = (partial + data).split(b"\n")
                    if len(partial) > 65536:  # a line that never ends
                        lines.append(partial)
                        partial = b""
                    for raw in lines:
                        line = raw.decode(errors="replace").rstrip("\r")
                        on_line(line)
                        if kept < max_output:
                            output.append(line)
                            kept += len(line) + 1
            if not timed_out:  # the output ended: the container is ending
                try:
                    proc.wait(max(end - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    timed_out = True
        finally:
            if proc.poll() is None:  # timed out, or interrupted: the container must not outlive this
                self.remove(spec.name)
                try:
                    proc.wait(ENGINE_CALL_TIMEOUT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            proc.stdout.close()
        if partial:
            line = partial.decode(errors="replace").rstrip("\r")
            on_line(line)
            output.append(line)
        seconds = time.monotonic() - start
        if timed_out:
            raise JobTimeout(f"container {spec.name} (image {spec.image}) timed out after {seconds:.0f} s "
                             f"running {' '.join(command)!r}: killed")
        if proc.returncode == ENGINE_ERROR:
            raise InfrastructureError(f"container {spec.name} (image {spec.image}) did not start: "
                                      f"{self.name}: {_last_line(chr(10).join(output))}")
        return RunResult(spec.name, proc.returncode, "\n".join(output), seconds)

    def remove(self, name: str) -> bool:
        """Kill and remove container ``name`` if it exists; True when one was removed."""
        # podman's rm --force waits 10 s for the stop signal first; a job's container is killed at once
        done = self.call("rm", "--force", *(["--time=0"] if self.name == "podman" else []), name)
        return done.returncode == 0 and bool(done.stdout.strip())

    def containers(self, prefix: str) -> list[str]:
        """Names of this engine's containers (running or not) that start with ``prefix``."""
        done = self.call("ps", "--all", "--format", "{{.Names}}")
        if done.returncode != 0:
            raise InfrastructureError(f"{self.name} ps failed: {_last_line(done.stderr)}")
        return sorted(name for name in done.stdout.split() if name.startswith(prefix))


def docker_answers(program: str = "docker") -> bool:
    """True when a docker daemon answers this worker's docker client."""
    if not shutil.which(program):
        return False
    try:
        done = subprocess.run([program, "version", "--format", "{{.Server.Version}}"], capture_output=True,
                              text=True, timeout=10, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and bool(done.stdout.strip())


def config_problem(dispatcher: Mapping) -> str | None:
    """What is wrong with the dispatcher configuration's ``container_engine`` (None: nothing)."""
    value = dispatcher.get(CONFIG_KEY)
    if value is None or value in ENGINES:
        return None
    return f"{CONFIG_KEY}: {value!r} is not a container engine; known: {', '.join(ENGINES)}"


def engine_for(dispatcher: Mapping) -> Engine:
    """The worker's engine: the one ``container_engine`` names, else docker where its daemon answers,
    else podman. A bad ``container_engine`` is the worker's fault, not the job's: InfrastructureError."""
    wrong = config_problem(dispatcher)
    if wrong:
        raise InfrastructureError(f"the worker's dispatcher configuration: {wrong}")
    name = dispatcher.get(CONFIG_KEY)
    if name is None:
        name = "docker" if docker_answers() else "podman"
    return Engine(name)


def registry_unreachable(registry: str) -> str | None:
    """Why this worker cannot reach ``registry`` (None: a TCP connection to it succeeds)."""
    host, _, port = registry.partition(":")
    if host == "localhost":
        return "localhost/ images exist on the worker only"
    if host == DEFAULT_REGISTRY:
        host = DOCKER_HUB
    try:
        with socket.create_connection((host, int(port or 443)), timeout=REGISTRY_CONNECT_TIMEOUT):
            return None
    except OSError as exc:
        reason = exc.strerror or exc.__class__.__name__
        return f"its registry {registry} is out of reach from the worker ({reason})"


def sweep(job_id: int, dispatcher: Mapping) -> list[str]:
    """Remove every ``pumice-<job id>-*`` container job ``job_id`` left (its runner died before its
    cleanup); return their names. An engine that is absent or broken has nothing to sweep."""
    try:
        engine = engine_for(dispatcher)
        if not shutil.which(engine.argv0):
            return []
        names = engine.containers(container_prefix(job_id))
        for name in names:
            engine.remove(name)
    except InfrastructureError:
        return []
    return names


def check_job_images(engine: Engine, images: Sequence[tuple[str, str, bool]]) -> list[str]:
    """Validation of a job's containers: the engine's problem, else each ``(where, image, local)``
    image's; messages prefixed with ``where`` (the job's YAML path)."""
    problem = engine.problem()
    if problem:
        return [f"{where}: {problem}" for where, _, _ in images[:1]]
    errors = []
    for where, image, local in images:
        wrong = engine.image_problem(image, local)
        if wrong:
            errors.append(f"{where}: {wrong}")
    return errors


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else "no message"


__all__ = ["ENGINES", "ContainerSpec", "Engine", "RunResult", "check_job_images", "config_problem",
           "container_prefix", "engine_for", "qualified", "registry_unreachable", "sweep"]
