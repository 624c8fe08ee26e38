"""Runs the suite unchanged on a GPU and on a CPU-only machine: where no CUDA device exists,
Triton kernels run on CPU tensors through the interpreter, which must be switched on before
triton is imported (it reads TRITON_INTERPRET once, at import). Also says which tests are slow
(the end of this file): `make test-fast` leaves them out, `make test` runs them."""
import os
import sys

import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# The oracles are float64 or IEEE float32: TF32 in cuBLAS (off by default) or cuDNN (on by default)
# would round the references' matmuls to 10-bit mantissas on Ampere and later GPUs.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# ---------------------------------------------------------------------------------------------
# The fast tier: `make test-fast` (pytest -m "not slow") is the inner loop, under 3 minutes on a
# 2-core CPU machine; `make test` runs everything. This is the one place that says what is slow
# (no @pytest.mark.slow in the test files): whole modules, tests by name (every parametrization
# of `module::function`, or one `module::function[id]`), and the module-level tests that push
# whole networks through the Triton interpreter. Every op's own checks (outputs and gradients
# against the reference on every backend, the reference against its oracle, bad input) stay fast.

SLOW_MODULES = {
    "test_triton_compile": "AOT-compiles every Triton kernel and autotune config for sm_80/sm_90 (minutes)",
    "test_cuda_emulation": "builds the CUDA kernels with g++ against a CUDA emulation and runs every shape",
    "test_example_gumbel_task_pairs": "a reduced run of the paper's experiment (examples/)",
    "test_example_sluice": "a reduced run of the paper's experiment (examples/)",
    "test_example_sparse_sharing": "a reduced run of the paper's experiment (examples/)",
    "test_build": "configures and builds the native module with CMake in a subprocess",
    "test_gpu_check": "make gpu-check's dry run in subprocesses (1-3 min)",
    "test_distributed": "2-rank DDP and FSDP2 runs in worker subprocesses (about 15 s)",
    "test_example_ddp": "the DDP example under torchrun, 2 ranks and 1 (about 25 s)",
}

SLOW_TESTS = {
    # subprocesses
    "test_native_boundary::test_fuzz_every_entry_point_refuses_mismatched_buffers": "the native fuzz, in a subprocess",
    "test_bench_harness::test_every_line_is_a_record_with_every_field": "`python -m bench` in a subprocess",
    "test_bench_harness::test_measured_records_are_sane": "the same `python -m bench` run",
    "test_bench_harness::test_provider_that_cannot_run_has_a_reason": "the same `python -m bench` run",
    "test_bench_harness::test_report_table_and_png": "the same `python -m bench` run",
    "test_bench_harness::test_cpu_records_carry_fractions_of_the_measured_machine": "the same `python -m bench` run",
    "test_cpu_vector_width::test_avx2_width_in_a_subprocess": "a Python subprocess with the AVX2 width forced",
    "test_masked_linear::test_cpu_portable_loops_on_an_avx512_machine": "a Python subprocess with the AVX2 width forced",
    "test_bench_harness::test_masked_lstm_records": "`python -m bench` on the LSTM workload in a subprocess",
    "test_native_boundary::test_public_reproducers_raise_instead_of_crashing": "Python subprocesses",
    "test_native_boundary::test_native_reproducers_raise_instead_of_crashing": "Python subprocesses",
    "test_issue12_reproducers::test_no_crash": "a Python subprocess per case",
    "test_profile::test_command_line_profiles_a_workload": "`python -m bench.profile` in a subprocess",
    "test_profile::test_command_line_errors": "`python -m bench.profile` in a subprocess per case",
    "test_info::test_command_line": "`python -m mtlfast.info` in a subprocess",
    # large samples (the small-sample statistics and the noise's finiteness stay fast: test_gumbel's
    # reference and cpu frequencies, test_noise_is_never_infinite, test_triton_gumbel)
    "test_gumbel::test_frequency_matches_sigmoid[triton]": "2^13 draws per logit through the interpreter",
    "test_gumbel::test_no_nan_or_inf_at_extreme_logits": "10^6 to 10^7 draws per backend",
    "test_gumbel::test_seeds[triton]": "five samples of 4096 through the interpreter",
    # numerical and second derivatives, torch.compile of LSTMs (first-order gradients against the
    # reference, in float64 too, stay fast)
    "test_masked_lstm::test_gradcheck_float64": "numerical Jacobians of the LSTM op",
    "test_higher_order::test_gradgradcheck_float64": "gradgradcheck of every op",
    "test_higher_order::test_sparse_sharing_lstm_gradgradcheck": "gradgradcheck of the module",
    "test_lstm_dropin::test_gradgrad": "double backward against torch.nn.LSTM's",
    "test_masked_lstm::test_compile_fullgraph": "torch.compile of the LSTM op, forward and backward",
    "test_autocast::test_compiled_agrees_with_eager": "torch.compile under autocast",
    "test_no_host_sync::test_training_steps_compile_fullgraph": "torch.compile of three training steps",
    "test_autotune::test_every_candidate_computes_the_reference":
        "every GPU autotune candidate of every Triton kernel (127) through the interpreter",
    "test_sparse_sharing_lstm::test_bias_gradients_accumulate_once[reference-compiled]": "torch.compile of a network",
    # the custom-op registration of the LSTM op through the interpreter (opcheck runs it many times;
    # the other ops' opchecks stay fast)
    "test_op_definitions::test_opcheck[masked_lstm_layer-triton]": "opcheck of the LSTM op, interpreted",
    "test_op_definitions::test_backward_op_for_every_needs[masked_lstm_layer-triton]": "the same, every `needs`",
    # the benchmark runner over every provider of two workloads, torch.compile included
    "test_bench_gumbel::test_random_op_providers_are_timed_not_compared": "every provider, compiled ones too",
}

# Whole networks (SparseSharingLSTM, SluiceLSTM) through the Triton interpreter, seconds each: the
# tests of these modules (all of them, or those named) run with backend "triton" on a CPU. The
# ops' Triton kernels keep their fast checks (test_masked_lstm.py, test_triton_*.py, ...).
SLOW_UNDER_THE_INTERPRETER = {
    "test_sparse_sharing_lstm": None,
    "test_mask_semantics": {"test_lstm_uses_the_mask_as_it_is_now", "test_lstm_ignores_inf_and_nan_outside_the_mask"},
    "test_autocast": {"test_sparse_sharing_lstm_as_torch_lstm", "test_sluice_lstm"},
    "test_sluice": {"test_identity_alpha_equals_independent_lstms"},
}


def _slow_reason(item: pytest.Item) -> str | None:
    module = getattr(item, "module", None)
    module = module.__name__.rsplit(".", 1)[-1] if module else ""
    if module in SLOW_MODULES:
        return SLOW_MODULES[module]
    name = f"{module}::{getattr(item, 'originalname', item.name)}"
    reason = SLOW_TESTS.get(f"{module}::{item.name}") or SLOW_TESTS.get(name)
    if reason:
        return reason
    callspec = getattr(item, "callspec", None)
    if (DEVICE.type == "cpu" and module in SLOW_UNDER_THE_INTERPRETER and callspec is not None
            and callspec.params.get("backend") == "triton"):
        only = SLOW_UNDER_THE_INTERPRETER[module]
        if only is None or getattr(item, "originalname", item.name) in only:
            return "a whole network through the Triton interpreter"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    for item in items:
        if _slow_reason(item):
            item.add_marker(pytest.mark.slow)
