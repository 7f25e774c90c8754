"""agent/overlay.py: the overlay's layout, generated scripts (golden), cpio packing and ramdisks."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import stat
import subprocess
import zlib
from pathlib import Path

import pytest
import yaml
from golden import check_golden

from agent.errors import JobError
from agent.overlay import (
    TestDefinition,
    append_to_ramdisk,
    build_overlay,
    flatten_environment,
    literal_case_ids,
    pack_cpio,
    parameter_value,
    results_path,
    sh_quote,
    stage_command,
)

CPIO = shutil.which("cpio")

#: a fixed definition for the golden run.sh and install.sh
GOLDEN_DEFINITION = {
    "metadata": {
        "format": "Lava-Test Test Definition 1.0",
        "name": "golden",
        "description": "every feature of run.sh generation",
    },
    "params": {"ITERATIONS": 3, "MODE": "quick", "SKIP_INSTALL": False, "bad-name": "x"},
    "install": {
        "deps": ["fio", "iperf3"],
        "git-repos": ["https://example.com/tools.git"],
        "steps": ["make -C tools", "cp tools/bin/* ."],
    },
    "run": {
        "steps": [
            "lava-test-case uname --shell uname -a",
            "lava-test-case awk --shell \"cat /proc/cpuinfo | awk '{print $1}'\"",
            './run-tests.sh $1 "$MODE"',
            'echo "<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=manual RESULT=pass>"',
            None,
            "for i in $(seq $ITERATIONS); do\n  lava-test-case iter-$i --result pass\ndone\n",
        ]
    },
    "parse": {"pattern": "^(?P<test_case_id>\\S+): (?P<result>\\w+)$"},
}


def golden_tests() -> list[list[TestDefinition]]:
    return [
        [
            TestDefinition(
                "golden-tests",
                dict(GOLDEN_DEFINITION),
                path="inline/golden.yaml",
                parameters={"MODE": 'it\'s "full" $HOME `x`'},
            )
        ]
    ]


def test_run_sh_golden(tmp_path: Path):
    top = build_overlay(tmp_path, "12", golden_tests())
    test_dir = top / "0" / "tests" / "0_golden-tests"
    check_golden("overlay/run.sh", (test_dir / "run.sh").read_text())
    check_golden("overlay/install.sh", (test_dir / "install.sh").read_text())
    check_golden("overlay/environment", (top / "environment").read_text())


def test_layout(tmp_path: Path):
    source = tmp_path / "checkout"
    (source / "ubuntu").mkdir(parents=True)
    (source / "ubuntu" / "smoke.yaml").write_text("metadata: {name: smoke}\n")
    (source / "scripts").mkdir()
    (source / "scripts" / "check.sh").write_text("#!/bin/sh\necho checked\n")
    (source / "scripts" / "check.sh").chmod(0o755)
    (source / "link").symlink_to("scripts/check.sh")
    smoke = TestDefinition(
        "smoke",
        {"metadata": {"name": "smoke"}, "run": {"steps": ["true"]}},
        source=source,
        path="ubuntu/smoke.yaml",
    )
    inline = TestDefinition(
        "inline-tests", {"metadata": {"name": "i"}, "run": {"steps": ["true"]}}, path="inline/inline.yaml"
    )
    later = TestDefinition("later", {"metadata": {"name": "later"}}, uuid="given-uuid")
    top = build_overlay(tmp_path / "overlay", "12", [[smoke, inline], [], [later]], environment={"SERVER": "10.0.0.1"})

    assert top == tmp_path / "overlay" / "lava-12"
    files = sorted(str(p.relative_to(top)) for p in top.rglob("*") if not p.is_dir())
    scripts = sorted(
        p.name for p in (Path(__file__).parent.parent / "agent" / "testshell").iterdir() if p.name.startswith("lava-")
    )
    assert files == sorted(
        [f"bin/{name}" for name in scripts]
        + ["environment", "0/lava-test-runner.conf", "1/lava-test-runner.conf", "2/lava-test-runner.conf"]
        + [
            f"0/tests/0_smoke/{name}"
            for name in ("ubuntu/smoke.yaml", "scripts/check.sh", "link", "run.sh", "uuid", "testdef.yaml")
        ]
        + [f"0/tests/1_inline-tests/{name}" for name in ("inline/inline.yaml", "run.sh", "uuid", "testdef.yaml")]
        + [f"2/tests/2_later/{name}" for name in ("run.sh", "uuid", "testdef.yaml")]
    )
    assert "lava-test-runner" in scripts and "README.md" not in scripts
    for name in scripts:
        assert stat.S_IMODE((top / "bin" / name).stat().st_mode) == 0o755
    smoke_dir = top / "0" / "tests" / "0_smoke"
    assert stat.S_IMODE((smoke_dir / "run.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((smoke_dir / "scripts" / "check.sh").stat().st_mode) == 0o755
    assert os.readlink(smoke_dir / "link") == "scripts/check.sh"
    assert (
        top / "0" / "lava-test-runner.conf"
    ).read_text() == "/lava-12/0/tests/0_smoke\n/lava-12/0/tests/1_inline-tests\n"
    assert (top / "1" / "lava-test-runner.conf").read_text() == ""
    assert (top / "2" / "lava-test-runner.conf").read_text() == "/lava-12/2/tests/2_later\n"
    assert (smoke_dir / "uuid").read_text() == "12_0.0" and smoke.uuid == "12_0.0"
    assert (top / "0" / "tests" / "1_inline-tests" / "uuid").read_text() == "12_0.1"
    assert (top / "2" / "tests" / "2_later" / "uuid").read_text() == "given-uuid"
    # testdef.yaml and an inline definition's file are YAML that reads back as the definition
    assert yaml.safe_load((smoke_dir / "testdef.yaml").read_text()) == smoke.definition
    inline_file = top / "0" / "tests" / "1_inline-tests" / "inline" / "inline.yaml"
    assert yaml.safe_load(inline_file.read_text()) == inline.definition
    environment = (top / "environment").read_text()
    assert "export SERVER='10.0.0.1'\n" in environment and "export LAVA_JOB_ID='12'\n" in environment
    with pytest.raises(FileExistsError):
        build_overlay(tmp_path / "overlay", "12", [[]])


def test_result_directories_of_literal_case_ids(tmp_path: Path):
    """The overlay holds results/<ID>/ for each case a step names as it is, so that
    lava-test-case forks no mkdir on the board; IDs made by an expansion are left to it."""
    steps = [
        "lava-test-case plain --shell true",
        "true && lava-test-case after-and --result pass",
        "for i in 1 2; do lava-test-case iter-$i --result pass; done",
        "if true; then lava-test-case in-then --result skip; fi",
        'lava-test-case "quoted" --result pass',
        "lava-test-case $NAME --result pass",
        "echo lava-test-case not-a-call",
        "lava-test-case --bad",
    ]
    test = TestDefinition("cases", {"metadata": {"name": "cases"}, "run": {"steps": steps}})
    assert literal_case_ids(test) == {"plain", "after-and", "in-then"}
    top = build_overlay(tmp_path, "12", [[test]])
    results = top / "0" / "results" / "0_cases" / "results"
    assert sorted(path.name for path in results.iterdir()) == ["after-and", "in-then", "plain"]
    assert not [path for path in results.rglob("*") if path.is_file()]  # empty until the board writes


def test_results_dir_forms(tmp_path: Path):
    assert results_path("12") == "/lava-12"
    assert results_path("12", "/lava-%s") == "/lava-12"
    assert results_path("12", "/var/lib/lava-{job_id}/") == "/var/lib/lava-12"
    assert stage_command("12", 0) == "/lava-12/bin/lava-test-runner /lava-12/0"
    assert stage_command("12", 3, "/data/lava-%s") == "/data/lava-12/bin/lava-test-runner /data/lava-12/3"
    top = build_overlay(tmp_path, "5", [[]], results_dir="/data/lava-%s")
    assert top == tmp_path / "data" / "lava-5"
    with pytest.raises(JobError, match="must be an absolute directory"):
        results_path("12", "lava-%s")


def test_install_sh_only_with_steps(tmp_path: Path, caplog):
    deps_only = TestDefinition("deps-only", {"metadata": {}, "install": {"deps": ["fio"]}, "run": {"steps": ["true"]}})
    skipped = TestDefinition("skipped", {"install": {"steps": ["make"]}}, skip_install=["steps"])
    kept = TestDefinition("kept", {"install": {"deps-debian": ["fio"], "steps": ["make"]}}, skip_install=["deps"])
    top = build_overlay(tmp_path, "1", [[deps_only, skipped, kept]])
    assert not (top / "0" / "tests" / "0_deps-only" / "install.sh").exists()
    assert "install deps: fio: not installed by Pumice" in caplog.text
    assert not (top / "0" / "tests" / "1_skipped" / "install.sh").exists()
    install_sh = (top / "0" / "tests" / "2_kept" / "install.sh").read_text()
    assert install_sh.endswith("pwd\nmake\n") and "not installed" not in install_sh


def test_kmsg_signals(tmp_path: Path):
    top = build_overlay(tmp_path, "1", [[TestDefinition("k", {}, lava_signal="kmsg")]])
    run_sh = (top / "0" / "tests" / "0_k" / "run.sh").read_text()
    assert run_sh.index("export KMSG=true\n") < run_sh.index("<LAVA_SIGNAL_STARTRUN")
    with pytest.raises(JobError, match="lava-signal 'serial' is not one of: stdout, kmsg"):
        build_overlay(tmp_path / "x", "1", [[TestDefinition("k", {}, lava_signal="serial")]])


@pytest.mark.parametrize(
    ("tests", "message"),
    [
        ([[TestDefinition("a", {}), TestDefinition("a", {})]], "name 'a' is used twice"),
        ([[TestDefinition("a", {})], [TestDefinition("a", {})]], "name 'a' is used twice"),
        ([[TestDefinition("lava", {})]], "the name 'lava' is reserved"),
        ([[TestDefinition("my tests", {})]], "may only use letters, digits"),
        ([[TestDefinition("../up", {})]], "may only use letters, digits"),
        (
            [[TestDefinition("a", {"run": {"steps": [{"echo foo": "bar"}]}})]],
            r"run.steps\[0\]: must be a shell command \(a string\), not dict \(an unquoted ': '",
        ),
        ([[TestDefinition("a", {"run": {"steps": "echo"}})]], "run.steps: must be a list"),
        ([[TestDefinition("a", {"params": ["X=1"]})]], "params: must be a mapping"),
        ([[TestDefinition("a", {}, parameters=["X"])]], "parameters: must be a mapping"),
        ([[TestDefinition("a", {}, path="../../escape.yaml")]], "leaves the test directory"),
    ],
)
def test_definition_faults(tmp_path: Path, tests, message):
    with pytest.raises(JobError, match=message):
        build_overlay(tmp_path, "1", tests)


def test_environment_faults_and_flattening(tmp_path: Path):
    with pytest.raises(JobError, match="'BAD-NAME' is not a valid shell variable name"):
        build_overlay(tmp_path, "1", [[]], environment={"BAD-NAME": "x"})
    assert flatten_environment({"A": {"B": [1, True, None]}, "C": "x", "D": False}) == {
        "A_B_0": "1",
        "A_B_1": "1",
        "A_B_2": "",
        "C": "x",
        "D": "0",
    }


def test_quoting_helpers():
    assert sh_quote("it's") == "'it'\\''s'"
    assert sh_quote("") == "''"
    with pytest.raises(JobError, match="NUL"):
        sh_quote("a\0b")
    assert [parameter_value(v) for v in (None, False, 0, "", [], True, 1, 2.5, "x")] == [
        "",
        "",
        "",
        "",
        "",
        "True",
        "1",
        "2.5",
        "x",
    ]


# --- cpio ----------------------------------------------------------------------------------------


def sample_tree(root: Path) -> Path:
    """A small tree with what an overlay holds: nested dirs, modes, a symlink, odd sizes, a space."""
    (root / "lava-3" / "bin").mkdir(parents=True)
    (root / "lava-3" / "0" / "tests" / "0_a b").mkdir(parents=True)
    (root / "lava-3" / "empty").mkdir()
    (root / "lava-3" / "bin" / "lava-test-case").write_text("#!/bin/sh\necho hi\n")
    (root / "lava-3" / "environment").write_text("export A='1'\n")
    (root / "lava-3" / "0" / "tests" / "0_a b" / "data.bin").write_bytes(bytes(range(256)) * 3 + b"xyz")
    (root / "lava-3" / "0" / "tests" / "0_a b" / "empty-file").write_bytes(b"")
    (root / "lava-3" / "link").symlink_to("bin/lava-test-case")
    for path in root.rglob("*"):
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() or path.name == "lava-test-case" else 0o644)
    (root / "lava-3" / "empty").chmod(0o700)
    return root


def tree_listing(root: Path) -> list[tuple[str, str, int, str]]:
    """(path, mode, size, content hash or link target) of everything under root."""
    rows = []
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            detail = "-> " + os.readlink(path)
        elif stat.S_ISREG(info.st_mode):
            detail = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        else:
            detail = ""
        rows.append(
            (
                str(path.relative_to(root)),
                oct(info.st_mode),
                info.st_size if path.is_file() and not path.is_symlink() else 0,
                detail,
            )
        )
    return rows


def parse_newc(data: bytes) -> list[tuple[str, int, int, int, int, bytes]]:
    """Entries of an uncompressed newc archive: (name, mode, uid, gid, mtime, data), trailer excluded."""
    entries, offset = [], 0
    while True:
        header = data[offset : offset + 110]
        assert header[:6] == b"070701", f"bad magic at {offset}"
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        size, namesize = fields[6], fields[11]
        name_start = offset + 110
        name = data[name_start : name_start + namesize - 1].decode()
        data_start = name_start + namesize + (-(110 + namesize) % 4)
        body = data[data_start : data_start + size]
        offset = data_start + size + (-size % 4)
        if name == "TRAILER!!!":
            return entries
        entries.append((name, fields[1], fields[2], fields[3], fields[5], body))


def test_pack_cpio_is_deterministic_and_golden(tmp_path: Path):
    root = sample_tree(tmp_path / "tree")
    archive = pack_cpio(root)
    assert archive == pack_cpio(root)
    raw = gzip.decompress(archive)
    entries = parse_newc(raw)
    names = [name for name, *_ in entries]
    directories = [name for name, mode, *_ in entries if stat.S_ISDIR(mode)]
    assert names[: len(directories)] == directories  # directories first
    assert all(uid == 0 and gid == 0 and mtime == 0 for _, _, uid, gid, mtime, _ in entries)
    assert len(raw) % 4 == 0
    listing = "".join(f"{oct(mode)} {len(body):6d} {name}\n" for name, mode, _, _, _, body in entries)
    check_golden(
        "overlay/cpio-listing.txt",
        listing + f"sha256 of the uncompressed archive: {hashlib.sha256(raw).hexdigest()}\n",
    )


@pytest.mark.skipif(CPIO is None, reason="GNU cpio is not installed")
def test_pack_cpio_extracts_with_gnu_cpio(tmp_path: Path):
    root = sample_tree(tmp_path / "tree")
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run(
        [CPIO, "-idmv", "--no-absolute-filenames"],
        input=gzip.decompress(pack_cpio(root)),
        cwd=out,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert tree_listing(out) == tree_listing(root)


def test_overlay_round_trip_through_cpio(tmp_path: Path):
    """A whole overlay packs and unpacks to the same tree, executable bits included."""
    build_overlay(tmp_path / "overlay", "9", [[TestDefinition("t", {"run": {"steps": ["true"]}})]])
    if CPIO is None:
        pytest.skip("GNU cpio is not installed")
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(
        [CPIO, "-idm"],
        input=gzip.decompress(pack_cpio(tmp_path / "overlay")),
        cwd=out,
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert tree_listing(out) == tree_listing(tmp_path / "overlay")


def unpack_initramfs(data: bytes) -> dict[str, bytes]:
    """Read an initramfs the way the kernel does: archives one after the other, gzip or not,
    zero padding between them; later entries replace earlier ones."""
    files: dict[str, bytes] = {}
    offset = 0
    while offset < len(data):
        if data[offset] == 0:
            offset += 1
            continue
        assert offset % 4 == 0, f"archive at offset {offset} is not 4-byte aligned"
        if data[offset : offset + 2] == b"\x1f\x8b":
            inflate = zlib.decompressobj(wbits=31)
            raw = inflate.decompress(data[offset:])
            assert inflate.eof
            consumed = len(data) - offset - len(inflate.unused_data)
        else:
            raw = data[offset:]
            consumed = None
        entries = parse_newc(raw)
        for name, mode, *_, body in entries:
            files[name] = body if not stat.S_ISDIR(mode) else b"<dir>"
        if consumed is None:
            break
        offset += consumed
    return files


def test_append_to_ramdisk(tmp_path: Path):
    base = tmp_path / "base"
    (base / "etc").mkdir(parents=True)
    (base / "etc" / "issue").write_text("board\n")
    ramdisk = tmp_path / "initramfs.cpio.gz"
    # a ramdisk whose size is not a multiple of 4, as gzip output usually is not
    data = pack_cpio(base)
    ramdisk.write_bytes(data + (b"\0" if len(data) % 4 == 0 else b""))
    size = ramdisk.stat().st_size
    overlay = sample_tree(tmp_path / "overlay")
    append_to_ramdisk(ramdisk, overlay)
    data = ramdisk.read_bytes()
    padded = size + (-size % 4)
    assert data[size:padded] == b"\0" * (padded - size)
    assert data[padded:] == pack_cpio(overlay)
    files = unpack_initramfs(data)
    assert files["etc/issue"] == b"board\n"
    assert files["lava-3/environment"] == b"export A='1'\n"


def test_append_refuses_a_uboot_image(tmp_path: Path):
    ramdisk = tmp_path / "ramdisk.cpio.gz.uboot"
    ramdisk.write_bytes(b"\x27\x05\x19\x56" + b"\0" * 60 + b"payload")
    with pytest.raises(ValueError, match="U-Boot image header"):
        append_to_ramdisk(ramdisk, sample_tree(tmp_path / "overlay"))
    assert ramdisk.read_bytes().endswith(b"payload")
