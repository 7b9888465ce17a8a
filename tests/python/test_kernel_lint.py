"""scripts/kernel_lint.py's parsing and occupancy arithmetic, on fixed ptxas / PTX / SASS text
(the lint itself runs in scripts/run_tests.sh wherever nvcc is installed)."""
import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("kernel_lint", ROOT / "scripts" / "kernel_lint.py")
lint = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lint)

PTXAS = """\
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_80'
ptxas info    : Function properties for _Z3fooPf
    8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 96 registers, used 1 barriers, 27200 bytes smem, 560 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3barv' for 'sm_90a'
ptxas info    : Function properties for _Z3barv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 560 bytes cmem[0]
"""

SASS = """\
.text._Z3fooPf:
        /*0530*/                   CALL.REL.NOINC `($__internal_0_$__cuda_sm20_div_s64) ;
        /*0540*/                   LDSM.16.M88.4 R4, [R2] ;
        /*0550*/                   HMMA.16816.F32.BF16 R8, R4, R12, R8 ;
        /*0560*/               @P0 CALL.REL.NOINC `(.L_x_6) ;
        /*0570*/                   CALL.REL.NOINC `($__internal_1_$__cuda_sm3x_div_rn_noftz_f32_slowpath) ;
.text._Z3barv:
        /*0010*/                   HMMA.16816.F32 R8, R4, R12, R8 ;
        /*0020*/                   HGMMA.64x128x16.F32.BF16 R24, R88, gdesc[UR4], R24, gsb0 ;
"""

PTX = """\
.visible .entry _Z3fooPf(
    .param .u64 _Z3fooPf_param_0
)
.maxntid 128, 1, 1
.minnctapersm 2
{
}
.visible .entry _Z3barv(
)
{
}
"""


def test_parse_ptxas_reads_registers_smem_stack_and_spills():
    info = lint.parse_ptxas(PTXAS)
    assert info[("_Z3fooPf", "sm_80")] == dict(regs=96, smem=27200, stack=8, spill_st=12, spill_ld=16)
    assert info[("_Z3barv", "sm_90a")] == dict(regs=32, smem=0, stack=0, spill_st=0, spill_ld=0)


def test_parse_sass_counts_64bit_division_calls_ldsm_hmma_and_hgmma():
    sass = lint.parse_sass(SASS)
    assert sass["_Z3fooPf"] == dict(ldsm=1, hmma=1, hgmma=0, div64=1)  # the f32 slow path is not integer
    assert sass["_Z3barv"] == dict(ldsm=0, hmma=1, hgmma=1, div64=0)  # HGMMA is not counted as HMMA


def test_parse_ptx_takes_the_cta_size_from_launch_bounds():
    assert lint.parse_ptx(PTX) == {"_Z3fooPf": 128, "_Z3barv": 0}


@pytest.mark.parametrize("arch, regs, smem, threads, expect", [
    ("sm_80", 64, 64, 256, 4),      # registers: 64 x 256 = 16K of 64K
    ("sm_80", 96, 27200, 128, 5),   # registers: 3072 per warp -> 21 warps -> 5 CTAs of 4
    ("sm_90a", 72, 27712, 128, 7),  # shared memory: 228 KiB / (27712 + 1 KiB reserved)
    ("sm_80", 26, 64, 256, 8),      # threads: 2048 per SM
    ("sm_80", 255, 0, 256, 1),
])
def test_ctas_per_sm(arch, regs, smem, threads, expect):
    assert lint.ctas_per_sm(arch, regs, smem, threads) == expect


def test_every_kernel_family_has_a_rule_and_fp32_gemv_its_own():
    assert lint.rule_for("gemv_4bit_kernel<float, true, 8>")[1] == 2
    assert lint.rule_for("gemv_4bit_kernel<__nv_bfloat16, true, 1>")[1] == 4
    assert lint.rule_for("tiled_4bit_kernel<__half, false, true>")[0] is True
    assert lint.rule_for("some_new_kernel<float>") is None


def test_write_docs_replaces_only_the_marked_table(tmp_path, monkeypatch):
    doc = tmp_path / "kernels.md"
    doc.write_text(f"intro\n{lint.BEGIN}\nold table\n{lint.END}\noutro\n")
    monkeypatch.setattr(lint, "DOCS", doc)
    row = dict(file="a.cu", name="k<float>", arch="sm_80", threads=256, regs=32, smem=64, stack=0,
               spill_st=0, spill_ld=0, ldsm=0, hmma=0, hgmma=2, ctas=8, floor=4)
    lint.write_docs([row])
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("\noutro\n")
    assert "old table" not in text
    assert "| a.cu | `k<float>` | sm_80 | 256 | 32 | 64 | 0 / 0 | 0 | 0 | 2 | 8 (4) |" in text
