import pytest
import torch

from bigbatch import config
from bigbatch.config import ConfigError
from bigbatch.trainer.models import build_model, residual_last_bn


def test_vector_models_give_logits():
    for name in ("mlp", "cnn1d"):
        m = build_model(config.load(None, [f"model.name={name}"]).model, (40,), 10)
        assert m(torch.randn(5, 40)).shape == (5, 10)


@pytest.mark.parametrize("zero", [False, True])
def test_resnet_zero_init_residual_gamma(zero):
    m = build_model(config.load(None, ["model.name=resnet18", f"model.zero_init_residual={str(zero).lower()}",
                                       "model.small_input=true"]).model, (3, 32, 32), 10)
    gammas = [bn.weight for bn in residual_last_bn(m)]
    assert len(gammas) == 8  # 4 stages x 2 BasicBlocks
    assert all(bool((g == 0).all()) == zero for g in gammas)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_model_data_mismatch_is_a_config_error():
    with pytest.raises(ConfigError, match="model.name"):
        build_model(config.load(None, ["model.name=resnet18"]).model, (40,), 10)
