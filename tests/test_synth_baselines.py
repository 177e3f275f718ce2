"""Baselines: streamed PCA against a full SVD, ridge against scikit-learn, PCA-ridge recovers
a linear map, nearest returns the collection's own LoRA; all through the model folder."""

import pytest
import torch
from sklearn.linear_model import Ridge

from condlora.synthesis.baselines import PCARidge, streamed_pca
from condlora.synthesis.collection import LoRADataset
from condlora.synthesis.generate import SynthModel, generate_vectors, vectors_to_lora
from condlora.synthesis.model import BASELINE_FILE, ModelInfo
from condlora.synthesis.training import train_synthesis

from .synth_common import SPEC, linear_collection, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def chunked(x, rows):
    return lambda: (x[i : i + rows] for i in range(0, len(x), rows))


def test_streamed_pca_matches_the_full_svd():
    g = torch.Generator().manual_seed(0)
    # rank-5 structure with decaying scales plus a little noise, 60 x 40
    x = (torch.randn(60, 5, generator=g) * torch.tensor([9.0, 6, 4, 3, 2])) @ torch.randn(
        5, 40, generator=g
    )
    x = (x + 0.01 * torch.randn(60, 40, generator=g)).double()
    _, s_ref, vt_ref = torch.linalg.svd(x, full_matrices=False)
    components, s = streamed_pca(chunked(x, 7), 60, 40, k=5, oversample=5, iters=3)
    assert components.shape == (5, 40)
    torch.testing.assert_close(s, s_ref[:5], rtol=1e-6, atol=0)
    # the same directions up to sign: |<v_i, v_ref_j>| is the identity
    overlap = (components @ vt_ref[:5].T).abs()
    torch.testing.assert_close(overlap, torch.eye(5, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(components @ components.T, torch.eye(5, dtype=torch.float64))
    # more components than the data has: clamped to min(N, D)
    assert streamed_pca(chunked(x[:3], 2), 3, 40, k=10)[0].shape == (3, 40)


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    # exactly linear in the embedding (no noise): rank 4 around the mean
    return linear_collection(tmp_path_factory.mktemp("d") / "ds.safetensors", n=40, noise=0.0)


def test_pca_ridge_recovers_a_linear_lora_and_matches_sklearn(collection, tmp_path):
    path, vectors, emb, mixing, offset = collection
    cfg = tiny_config(path, "method=pca", "baseline.ridge=1e-9")
    out = train_synthesis(cfg, tmp_path / "pca")
    model = SynthModel.load(out)
    assert model.pca is not None and model.info.method == "pca"
    unseen = torch.randn(3, 4, generator=torch.Generator().manual_seed(7))
    got = model.vectors(unseen, num=2)
    assert got.shape == (3, 2, SPEC.size) and torch.equal(got[:, 0], got[:, 1])
    truth = unseen @ mixing.T + offset
    torch.testing.assert_close(got[:, 0], truth, atol=2e-4, rtol=2e-4)
    # the ridge map against scikit-learn's Ridge on the same PC coefficients
    cfg = tiny_config(path, "method=pca", "baseline.ridge=3.0")
    fitted = PCARidge.read(train_synthesis(cfg, tmp_path / "ridge") / BASELINE_FILE)
    info = ModelInfo.read(tmp_path / "ridge")
    coefs = info.standardise(vectors).double() @ fitted.components.T
    ref = Ridge(alpha=3.0).fit(emb.double().numpy(), coefs.numpy())
    torch.testing.assert_close(fitted.coef_map, torch.from_numpy(ref.coef_.T), atol=1e-6, rtol=0)
    pred = torch.from_numpy(ref.predict(unseen.double().numpy())) @ fitted.components
    torch.testing.assert_close(fitted.predict(unseen), pred.float(), atol=1e-5, rtol=0)


def test_nearest_returns_the_collections_lora_exactly(collection, tmp_path):
    path, vectors, emb, *_ = collection
    out = train_synthesis(tiny_config(path, "method=nearest"), tmp_path / "near")
    dataset = LoRADataset(path)
    query = emb[[5, 17]] + 0.01 * torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    got = generate_vectors(out, query, num=3)
    cos = torch.nn.functional.normalize(query, dim=1) @ torch.nn.functional.normalize(emb, dim=1).T
    order = cos.argsort(dim=1, descending=True)[:, :3]
    assert order[:, 0].tolist() == [5, 17]
    for i in range(2):
        for j in range(3):
            assert torch.equal(got[i, j], dataset.row(int(order[i, j])))
    weights = vectors_to_lora(out, got[0, 0])
    assert torch.equal(SPEC.flatten(weights), dataset.row(5))
    with pytest.raises(Exception, match="holds only 40"):
        generate_vectors(out, query, num=41)
