"""The line a LoRA campaign shows at start on a CPU that will train it in fp32."""

from __future__ import annotations

from finetune.model import DeviceSpec, cpu_has_native_bf16, cpu_precision_note, pick_device

FP32_CPU = DeviceSpec("cpu", "float32")


def test_the_note_appears_only_where_auto_precision_falls_back_to_fp32_on_the_cpu():
    note = cpu_precision_note("auto", use_gpu=False, device=FP32_CPU)
    assert note.startswith("this CPU shows no native bf16") and "fp32" in note and "three times" in note
    assert "no GPU is visible" in note and "\n" not in note
    bf16_cpu = DeviceSpec("cpu", "float32", "bfloat16")
    assert cpu_precision_note("auto", use_gpu=False, device=bf16_cpu) is None     # bf16 autocast runs
    gpu = DeviceSpec("cuda", "bfloat16")
    assert cpu_precision_note("auto", use_gpu=False, device=gpu) is None          # auto picked a visible GPU
    assert cpu_precision_note("auto", use_gpu=True, device=FP32_CPU) is None      # a GPU trains
    assert cpu_precision_note("fp32", use_gpu=False, device=FP32_CPU) is None     # the user chose fp32
    assert cpu_precision_note("bf16", use_gpu=False, device=FP32_CPU) is None     # ... or bf16


def test_on_this_cpu_the_note_says_what_the_device_choice_does():
    """The note and ``pick_device`` read the same flags: the note appears exactly where training on
    this CPU runs in fp32."""
    note = cpu_precision_note("auto", use_gpu=False)
    assert (note is not None) == (not cpu_has_native_bf16())
    assert (note is not None) == (pick_device("cpu", "auto").precision == "fp32")
