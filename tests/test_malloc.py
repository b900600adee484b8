"""The C allocator the ``tunelab`` command runs under (tunelab.malloc): tcmalloc or jemalloc where installed,
chosen by TUNELAB_MALLOC, recorded in the summary, and not passed on to the processes a run starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

from conftest import tiny_config
from tunelab import malloc

TCMALLOC = malloc.find("tcmalloc")
JEMALLOC = malloc.find("jemalloc")
needs_tcmalloc = pytest.mark.skipif(
    TCMALLOC is None, reason="libtcmalloc is not installed (make test installs Debian's libtcmalloc-minimal4)"
)


def python(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "TUNELAB_MALLOC")}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**environment, **env},
        timeout=120,
    )


PROBE = """
    import json, os, subprocess, sys
    from tunelab import malloc
    malloc.preload()
    child = subprocess.run([sys.executable, "-c", "from tunelab import malloc; print(malloc.in_use())"],
                           capture_output=True, text=True).stdout.strip()
    print(json.dumps({"malloc": malloc.in_use(), "pid": os.getpid(), "ld_preload": os.environ.get("LD_PRELOAD"),
                      "mark": os.environ.get("TUNELAB_MALLOC_PRELOADED"), "child": child,
                      "added": sorted({"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", "MALLOC_CONF"} & {*os.environ})}))
"""


@needs_tcmalloc
def test_the_command_runs_again_under_tcmalloc_and_its_children_get_the_environment_as_it_was():
    p = python(PROBE)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["malloc"] == "tcmalloc"
    assert out["ld_preload"] is None and out["mark"] is None  # the user's environment, for what the run starts
    assert out["added"] == []
    assert out["child"] == "glibc"

    p = python(PROBE, LD_PRELOAD="libm.so.6")  # whatever the user preloads stays preloaded, after ours
    out = json.loads(p.stdout)
    assert out["malloc"] == "tcmalloc" and out["ld_preload"] == "libm.so.6"

    p = python(PROBE, TUNELAB_MALLOC="system")
    assert json.loads(p.stdout)["malloc"] == "glibc"


@pytest.mark.skipif(JEMALLOC is None, reason="libjemalloc is not installed")
def test_tunelab_malloc_chooses_jemalloc():
    p = python(PROBE, TUNELAB_MALLOC="jemalloc")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["malloc"] == "jemalloc" and out["added"] == [] and out["child"] == "glibc"


def test_a_value_tunelab_malloc_cannot_take_or_a_missing_library_is_one_line_naming_what_is_allowed(
    monkeypatch, tiny_llama, memo_data, tmp_path
):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tiny_llama, memo_data, tmp_path / "run")))
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    p = subprocess.run(
        [sys.executable, "-m", "tunelab.cli", "validate", str(cfg)],
        capture_output=True,
        text=True,
        env={**env, "TUNELAB_MALLOC": "hoard"},
        timeout=120,
    )
    assert p.returncode == 2
    assert p.stderr.strip() == (
        "tunelab: error: TUNELAB_MALLOC=hoard: allowed values are auto, tcmalloc, jemalloc, system"
    )

    monkeypatch.setattr(malloc.ctypes.util, "find_library", lambda name: None)  # nothing installed
    monkeypatch.setenv("TUNELAB_MALLOC", "jemalloc")
    with pytest.raises(
        ValueError, match=r"TUNELAB_MALLOC=jemalloc: no libjemalloc is installed \(Debian: apt-get"
    ):
        malloc.preload()
    monkeypatch.setenv("TUNELAB_MALLOC", "auto")
    malloc.preload()  # auto without any: the C library's, and no error


def _train(cfg_path, *sets: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "TUNELAB_MALLOC")}
    args = [a for s in sets for a in ("--set", s)]
    return subprocess.run(
        [sys.executable, "-m", "tunelab.cli", "train", str(cfg_path), "--overwrite", *args],
        capture_output=True,
        text=True,
        env={**environment, "CUDA_VISIBLE_DEVICES": "", **env},
        timeout=300,
    )


@needs_tcmalloc
def test_a_run_records_its_allocator_and_the_glibc_lever_follows_it(tiny_llama, memo_data, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    run = tmp_path / "run"
    cfg.write_text(yaml.safe_dump(tiny_config(tiny_llama, memo_data, run, max_steps=2)))

    p = _train(cfg)
    assert p.returncode == 0, p.stderr[-3000:]
    levers = json.loads((run / "summary.json").read_text())["levers"]
    assert levers["malloc"] == "tcmalloc" and levers["allocator"] == "system"
    assert "tcmalloc" in levers["why"]["allocator"]

    p = _train(cfg, TUNELAB_MALLOC="system")
    assert p.returncode == 0, p.stderr[-3000:]
    levers = json.loads((run / "summary.json").read_text())["levers"]
    assert levers["malloc"] == "glibc" and levers["allocator"] == "reuse"

    p = _train(cfg, "training.allocator=reuse")  # glibc's lever asked for, under tcmalloc
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "training.allocator: reuse tunes glibc's allocator, not tcmalloc" in p.stderr


@needs_tcmalloc
def test_release_hands_freed_memory_back_to_the_system():
    p = python(
        """
        import ctypes, json
        from tunelab import malloc
        malloc.preload()
        def rss():
            return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024
        process = ctypes.CDLL(None)
        process.malloc.restype = ctypes.c_void_p
        blocks = [process.malloc(ctypes.c_size_t(1 << 20)) for _ in range(300)]  # 300 MiB, each page touched
        for b in blocks:
            ctypes.memset(b, 1, 1 << 20)
        for b in blocks:
            process.free(ctypes.c_void_p(b))
        held = rss()
        malloc.release()
        print(json.dumps({"malloc": malloc.in_use(), "held": held, "after": rss()}))
        """
    )
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["malloc"] == "tcmalloc"
    assert out["held"] - out["after"] > 200, out  # tcmalloc kept the freed blocks until asked
