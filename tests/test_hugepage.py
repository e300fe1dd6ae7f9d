"""Page sizes and transparent-huge-page settings (``aiopgalloc.host.hugepage``)."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from aiopgalloc.host import hugepage
from aiopgalloc.host.hugepage import (
    HUGE_PAGE_SIZE,
    PAGE_SIZE,
    read_huge_page_size,
    thp_settings,
)

REAL_THP = Path("/sys/kernel/mm/transparent_hugepage")


@pytest.fixture
def fake_thp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the module at an empty stand-in for the sysfs THP directory."""
    d = tmp_path / "transparent_hugepage"
    d.mkdir()
    monkeypatch.setattr(hugepage, "_THP_DIR", d)
    return d


@pytest.fixture
def fake_meminfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Redirect the module's reads of /proc/meminfo to a temporary file."""
    target = tmp_path / "meminfo"
    real_path = Path  # the module's own Path is pathlib's
    assert hugepage.__dict__["Path"] is Path

    def fake_path(*args: str) -> Path:
        p = real_path(*args)
        return target if str(p) == "/proc/meminfo" else p

    monkeypatch.setattr(hugepage, "Path", fake_path)
    return target


# -------------------------------------------------------------- the machine


def test_page_size_matches_the_kernel() -> None:
    assert PAGE_SIZE == mmap.PAGESIZE == os.sysconf("SC_PAGE_SIZE")


def test_huge_page_size_is_sane() -> None:
    assert HUGE_PAGE_SIZE > PAGE_SIZE
    assert HUGE_PAGE_SIZE % PAGE_SIZE == 0
    assert HUGE_PAGE_SIZE & (HUGE_PAGE_SIZE - 1) == 0
    assert read_huge_page_size() == HUGE_PAGE_SIZE


@pytest.mark.skipif(not (REAL_THP / "hpage_pmd_size").exists(), reason="no hpage_pmd_size in sysfs")
def test_huge_page_size_matches_sysfs() -> None:
    assert int((REAL_THP / "hpage_pmd_size").read_text()) == HUGE_PAGE_SIZE


def test_real_thp_settings_are_single_words() -> None:
    settings = thp_settings()
    for name, value in settings.items():
        assert name in ("enabled", "shmem_enabled", "defrag")
        assert value and " " not in value and "[" not in value
        assert f"[{value}]" in (REAL_THP / name).read_text()


# ---------------------------------------------------- read_huge_page_size


def test_sysfs_value_wins(fake_thp: Path, fake_meminfo: Path) -> None:
    (fake_thp / "hpage_pmd_size").write_text("1073741824\n")
    fake_meminfo.write_text("Hugepagesize:       2048 kB\n")
    assert read_huge_page_size() == 1 << 30


def test_falls_back_to_meminfo_when_sysfs_is_missing(fake_thp: Path, fake_meminfo: Path) -> None:
    fake_meminfo.write_text(
        "MemTotal:        8000000 kB\nHugePages_Total:       0\nHugepagesize:       4096 kB\n"
    )
    assert read_huge_page_size() == 4096 * 1024


@pytest.mark.parametrize("bad", ["", "garbage\n", "0\n", "-2097152\n"])
def test_falls_back_to_meminfo_when_sysfs_is_unusable(
    fake_thp: Path, fake_meminfo: Path, bad: str
) -> None:
    (fake_thp / "hpage_pmd_size").write_text(bad)
    fake_meminfo.write_text("Hugepagesize:       1024 kB\n")
    assert read_huge_page_size() == 1024 * 1024


@pytest.mark.parametrize(
    "meminfo",
    [
        None,  # missing file
        "MemTotal:        8000000 kB\n",  # no Hugepagesize line
        "Hugepagesize:\n",  # no value
        "Hugepagesize:    lots kB\n",  # not a number
    ],
    ids=["missing", "no-line", "no-value", "not-a-number"],
)
def test_defaults_to_2mib_when_nothing_can_be_read(
    fake_thp: Path, fake_meminfo: Path, meminfo: str | None
) -> None:
    if meminfo is not None:
        fake_meminfo.write_text(meminfo)
    assert read_huge_page_size() == 2 * 1024 * 1024


# ------------------------------------------------------------ thp_settings


def test_thp_settings_pick_the_bracketed_word(fake_thp: Path) -> None:
    (fake_thp / "enabled").write_text("always [madvise] never\n")
    (fake_thp / "shmem_enabled").write_text("always within_size advise [never] deny force\n")
    (fake_thp / "defrag").write_text("always defer [defer+madvise] madvise never\n")
    (fake_thp / "hpage_pmd_size").write_text("2097152\n")  # not a setting
    assert thp_settings() == {
        "enabled": "madvise",
        "shmem_enabled": "never",
        "defrag": "defer+madvise",
    }


def test_thp_settings_leave_out_missing_files(fake_thp: Path) -> None:
    (fake_thp / "enabled").write_text("[always] madvise never\n")
    assert thp_settings() == {"enabled": "always"}


def test_thp_settings_without_brackets_keep_the_text(fake_thp: Path) -> None:
    (fake_thp / "enabled").write_text("  never  \n")
    assert thp_settings() == {"enabled": "never"}


def test_thp_settings_on_a_machine_without_thp(fake_thp: Path) -> None:
    fake_thp.rmdir()
    assert thp_settings() == {}
