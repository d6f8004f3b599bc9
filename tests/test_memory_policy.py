"""The memory-pressure policy's decisions (pure logic) and Triton's memory figures from /metrics."""

from __future__ import annotations

import pytest

from adaptive_quant.core.memory_policy import MemoryPolicyConfig, MemorySample, VariantFacts, decide, dominated_by
from adaptive_quant.serving.memory_control import parse_triton_memory
from adaptive_quant.serving.settings import SettingsError, load_settings

CFG = MemoryPolicyConfig(enabled=True, cooldown_s=10.0, min_loaded=1)
HIGH = MemorySample(system_pct=95.0, process_pct=5.0)
MID = MemorySample(system_pct=85.0, process_pct=5.0)
LOW = MemorySample(system_pct=50.0, process_pct=5.0)


def facts(loaded=("fp32", "fp16", "int8"), usage=None, by_policy=()):
    usage = usage or {}
    # a CPU host: fp16 is no faster than fp32 and a little less accurate; int8 is 3× faster
    table = {"fp32": (2, 0.92, 0.76, 1_000_000), "fp16": (1, 0.919, 0.80, 500_000), "int8": (0, 0.91, 0.25, 250_000)}
    return [
        VariantFacts(k, rank, acc, ms, size, usage.get(k, 0.0), k in loaded, k in by_policy)
        for k, (rank, acc, ms, size) in table.items()
    ]


def test_pressure_unloads_the_dominated_variant_first_then_the_least_used():
    d = decide(HIGH, facts(usage={"fp16": 50, "fp32": 10, "int8": 40}), CFG, since_last_action_s=60)
    assert (d.action, d.variant) == ("unload", "fp16")  # fp32 makes it redundant however much it was used
    assert "dominated by fp32" in d.reason and "system memory 95.0% > 90%" in d.reason
    d = decide(HIGH, facts(loaded=("fp32", "int8"), usage={"fp32": 10, "int8": 40}), CFG, 60)
    assert (d.action, d.variant) == ("unload", "fp32")  # int8 answers most samples lately
    d = decide(HIGH, facts(loaded=("fp32", "int8")), CFG, 60)
    assert (d.action, d.variant) == ("unload", "int8")  # unused alike: keep the most precise (every floor answerable)


def test_min_loaded_cooldown_and_hysteresis_hold():
    assert decide(HIGH, facts(loaded=("fp32",)), CFG, 60).action == "hold"  # min_loaded 1
    d = decide(HIGH, facts(), CFG, since_last_action_s=3)
    assert d.action == "hold" and "cooling down" in d.reason
    d = decide(MID, facts(loaded=("fp32",), by_policy=("int8",)), CFG, 60)  # between 80 % and 90 %
    assert d.action == "hold" and d.pressure == "normal"


def test_eased_memory_loads_back_the_most_useful_variant_the_policy_unloaded():
    d = decide(LOW, facts(loaded=("fp32",), by_policy=("fp16", "int8")), CFG, 60)
    assert (d.action, d.variant, d.pressure) == ("load", "int8", "low")
    # a variant someone else unloaded is not the policy's to load
    assert decide(LOW, facts(loaded=("fp32",), by_policy=()), CFG, 60).action == "hold"


def test_server_and_process_figures_count_too():
    d = decide(MemorySample(50.0, 5.0, server_pct=97.0), facts(), CFG, 60)
    assert d.action == "unload" and "server memory 97.0% > 90%" in d.reason
    d = decide(MemorySample(50.0, 60.0), facts(), CFG, 60)
    assert d.action == "unload" and "process memory 60.0% > 50%" in d.reason


def test_unknown_accuracy_is_never_called_redundant():
    a = VariantFacts("a", 0, None, 1.0, 1, 0.0, True, False)
    b = VariantFacts("b", 2, 0.99, 0.5, 1, 0.0, True, False)
    assert dominated_by(a, [b]) is None and dominated_by(b, [a]) is None


def test_config_is_validated_and_loaded_from_serve_yaml():
    with pytest.raises(ValueError, match=r"'memory\.system_low_pct': must be < memory\.system_high_pct"):
        MemoryPolicyConfig(system_high_pct=70, system_low_pct=80)
    with pytest.raises(SettingsError, match="memory"):
        load_settings(overrides={"memory.system_high_pct": 50, "memory.system_low_pct": 60}, environ={})
    s = load_settings("configs/serve.yaml", environ={"AQ_MEMORY__ENABLED": "true"})
    assert s.memory.enabled and s.memory.system_high_pct == 90.0 and s.backend.model_control == "none"


def test_triton_memory_prefers_gpus_and_falls_back_to_host():
    gpu = (
        '# HELP nv_gpu_memory_used_bytes x\nnv_gpu_memory_used_bytes{gpu_uuid="GPU-1"} 30\n'
        'nv_gpu_memory_total_bytes{gpu_uuid="GPU-1"} 40\nnv_gpu_memory_used_bytes{gpu_uuid="GPU-2"} 10\n'
        'nv_gpu_memory_total_bytes{gpu_uuid="GPU-2"} 40\nnv_cpu_memory_used_bytes 1\nnv_cpu_memory_total_bytes 100\n'
    )
    assert parse_triton_memory(gpu) == pytest.approx(75.0)  # the fullest GPU decides
    assert parse_triton_memory("nv_cpu_memory_used_bytes 25\nnv_cpu_memory_total_bytes 100\n") == pytest.approx(25.0)
    assert parse_triton_memory("nv_inference_count 3\n") is None
