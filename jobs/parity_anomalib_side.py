"""anomalib's side of the parity harness (issue #21). Run by jobs/parity.py with the anomalib venv's
python (/work/anomalib_venv: anomalib 2.7.0, torch 2.14.1); imports anomalib, never raylib_ad.

    /work/anomalib_venv/bin/python jobs/parity_anomalib_side.py EXCHANGE_DIR MODEL [MODEL ...]

For each model: reads EXCHANGE_DIR/<model>/request.pt (anomalib's init arguments, our weights under
anomalib's keys, the batches and every random draw), builds anomalib.models.image.<model>.torch_model's
network with random weights (timm is never asked for pretrained weights: everything pretrained comes from
the request), loads the weights, runs anomalib's own code (fit for memory banks, eval forward, training loss
and its gradients) and writes EXCHANGE_DIR/<model>/response.pt: {"outputs": {name: tensor}, "grads":
{param: tensor}, "notes": [...], "error": str | None}.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")


def _no_pretrained_timm() -> None:
    import timm

    original = timm.create_model

    def create_model(name, pretrained=False, **kwargs):
        kwargs.pop("pretrained_cfg_overlay", None)
        return original(name, pretrained=False, **kwargs)

    timm.create_model = create_model  # anomalib calls it through the module attribute


def load(module: torch.nn.Module, state: dict, notes: list, strict_missing: bool = True) -> None:
    """Load our weights (anomalib's keys). Every key we send must exist; anomalib keys we do not send are
    listed in the notes (anomalib parts the comparison does not use, e.g. a backbone's unused tail); every
    parameter outside a timm backbone must be given (buffers such as fitted statistics are fitted there)."""
    state = dict(state)
    req_unused = state.pop("__unused__", None)
    result = module.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise KeyError(f"keys not in anomalib's model: {result.unexpected_keys[:5]} "
                       f"({len(result.unexpected_keys)} in all)")
    params = {n for n, _ in module.named_parameters()}
    # A timm backbone's tail past the last layer used: we truncate it, anomalib builds the whole net.
    given_nets = {k.split(".blocks.")[0] for k in state if ".blocks." in k}
    unused = tuple(req_unused or ())  # anomalib parameters its forward never calls (the request names them)
    missing = [k for k in result.missing_keys if k in params and k.split(".blocks.")[0] not in given_nets
               and not k.startswith(unused)]
    if missing and strict_missing:
        raise KeyError(f"anomalib parameters not given: {missing[:8]} ({len(missing)} in all)")
    if result.missing_keys:
        notes.append(f"{len(result.missing_keys)} anomalib keys kept at their random init (unused here)")


def grads_of(module: torch.nn.Module) -> dict:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


# --- memory banks ---------------------------------------------------------------------------------------

def padim(req, notes):
    from anomalib.models.image.padim.torch_model import PadimModel

    model = PadimModel(pre_trained=False, **req["init"])
    load(model, req["state"], notes)
    model.train()
    with torch.no_grad():
        model(req["inputs"]["train"])
    bank = torch.vstack(model.memory_bank)
    model.fit()
    model.eval()
    with torch.no_grad():
        out = model(req["inputs"]["test"])
    outputs = {"embedding": bank, "float32:gaussian.inv_covariance": model.gaussian.inv_covariance,
               "float32:score": out.pred_score.reshape(-1), "float32:anomaly_map": out.anomaly_map[:, 0]}
    # The same anomalib code fitted on OUR embedding (given as float64; anomalib's covariance buffer is float32
    # whatever the input, and its inverse float32), its statistics then used by its own scoring.
    model.gaussian.fit(req["inputs"]["embedding"].double())
    outputs["gaussian.mean"] = model.gaussian.mean.float()
    outputs["gaussian.inv_covariance"] = model.gaussian.inv_covariance.float()
    outputs["gaussian.inv_covariance(float32 inverse)"] = outputs["gaussian.inv_covariance"]
    model.gaussian.mean = model.gaussian.mean.float()
    model.gaussian.inv_covariance = model.gaussian.inv_covariance.float()
    with torch.no_grad():
        out = model(req["inputs"]["test"])
    outputs.update({"score": out.pred_score.reshape(-1), "anomaly_map": out.anomaly_map[:, 0]})
    return outputs


def patchcore(req, notes):
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    model = PatchcoreModel(pre_trained=False, **req["init"])
    load(model, req["state"], notes)
    model.train()
    with torch.no_grad():
        embedding = model(req["inputs"]["train"])
    model.memory_bank = req["inputs"]["memory_bank"]
    model.eval()
    with torch.no_grad():
        out = model(req["inputs"]["test"])
    return {"embedding": embedding, "score": out.pred_score, "anomaly_map": out.anomaly_map[:, 0]}


def dfm(req, notes):
    from anomalib.models.image.dfm.torch_model import DFMModel

    outputs = {}
    for score_type in ("fre", "nll"):
        model = DFMModel(pre_trained=False, **{**req["init"], "score_type": score_type})
        load(model, req["state"], notes)
        if score_type == "nll":
            _patch_single_class_gaussian(model.gaussian_model, notes)
        model.train()
        with torch.no_grad():
            model(req["inputs"]["train"])
            n = len(model.memory_bank[0])
            model.fit()
        model.eval()
        with torch.no_grad():
            out = model(req["inputs"]["test"])
        if score_type == "fre":
            pca = model.pca_model
            outputs.update({"pca.mean": pca.mean, "pca.singular_values_sq": pca.singular_values.double() ** 2 / n,
                            "pca.components": pca.singular_vectors.T, "score": out.pred_score,
                            "anomaly_map": out.anomaly_map[:, 0]})
        else:
            outputs["nll_score"] = out.pred_score
            # anomalib's fit centres the bank in place (PCA.fit: dataset -= mean) and PCA.transform subtracts
            # the mean again in place, so its Gaussian is fitted on x - 2*mean: the same code on copies.
            pca, gaussian = model.pca_model, model.gaussian_model
            model.train()
            with torch.no_grad():
                model.memory_bank = []
                model(req["inputs"]["train"])
                bank = torch.vstack(model.memory_bank)
                pca.fit(bank.clone())
                gaussian.fit(pca.transform(bank.clone()).T)
            model.eval()
            with torch.no_grad():
                outputs["nll_score_copies"] = model(req["inputs"]["test"]).pred_score
    return outputs


def _patch_single_class_gaussian(gaussian, notes) -> None:
    """anomalib 2.7's SingleClassGaussian.fit calls torch.mean(dataset, dim=1, device=...), which torch 2.14
    rejects (TypeError): DFM's "nll" cannot fit in anomalib 2.7 as released. Its fit with only that call
    fixed (the device argument dropped); everything else is anomalib's."""
    import math

    def fit(dataset):
        num_samples = dataset.shape[1]
        gaussian.mean_vec = torch.mean(dataset, dim=1)
        data_centered = (dataset - gaussian.mean_vec.reshape(-1, 1)) / math.sqrt(num_samples)
        gaussian.u_mat, gaussian.sigma_mat, _ = torch.linalg.svd(data_centered, full_matrices=False)

    gaussian.fit = fit
    notes.append("nll: anomalib's SingleClassGaussian.fit fails on torch 2.14 (torch.mean(..., device=)); "
                 "run with that one call fixed")


def dfkde(req, notes):
    from anomalib.models.image.dfkde.torch_model import DfkdeModel

    model = DfkdeModel(pre_trained=False, **req["init"])
    load(model, req["state"], notes)
    model.train()
    with torch.no_grad():
        model(req["inputs"]["train"])
        model.fit()
    model.eval()
    with torch.no_grad():
        features = model.get_features(req["inputs"]["test"])
        log_density = model.classifier.compute_kde_scores(features.clone(), as_log_likelihood=True)
        out = model(req["inputs"]["test"])
    return {"max_length": model.classifier.max_length, "log_density": log_density, "score": out.pred_score}


# --- gradient models --------------------------------------------------------------------------------------

def _eval_then_train(model, req, loss_fn):
    """Eval forward on the test batch, then one training loss on the train batch and its gradients (the
    order of our side: a train-mode batch norm would otherwise have moved first)."""
    model.eval()
    with torch.no_grad():
        out = model(req["inputs"]["test"])
    outputs = {"score": out.pred_score.reshape(-1), "anomaly_map": out.anomaly_map[:, 0]}
    train = req["inputs"]["train"]
    if req.get("train_dtype") == "float64":
        model.double()
        train = train.double()
    model.train()
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model(train))
    loss.backward()
    outputs["loss"] = loss.detach()
    return outputs, grads_of(model)


def stfpm(req, notes):
    from anomalib.models.image.stfpm.loss import STFPMLoss
    from anomalib.models.image.stfpm.torch_model import STFPMModel

    model = STFPMModel(**req["init"])
    load(model, req["state"], notes)
    loss = STFPMLoss()
    return _eval_then_train(model, req, lambda out: loss(*out))


def fastflow(req, notes):
    from anomalib.models.image.fastflow.loss import FastflowLoss
    from anomalib.models.image.fastflow.torch_model import FastflowModel

    init = dict(req["init"], input_size=tuple(req["init"]["input_size"]))
    model = FastflowModel(pre_trained=False, **init)
    load(model, req["state"], notes)
    loss = FastflowLoss()
    return _eval_then_train(model, req, lambda out: loss(*out))


def uflow(req, notes):
    from anomalib.models.image.uflow.loss import UFlowLoss
    from anomalib.models.image.uflow.torch_model import UflowModel

    init = dict(req["init"], input_size=tuple(req["init"]["input_size"]))
    model = UflowModel(**init)
    load(model, req["state"], notes)
    loss = UFlowLoss()
    return _eval_then_train(model, req, lambda out: loss(*out))


def csflow(req, notes):
    from anomalib.models.image.csflow.anomaly_map import AnomalyMapGenerator, AnomalyMapMode
    from anomalib.models.image.csflow.loss import CsFlowLoss
    from anomalib.models.image.csflow.torch_model import CrossScaleFlow, CsFlowModel

    # CsFlowModel would build torchvision's EfficientNet-B5 with ImageNet weights (a download): its flow,
    # score and map generator are built on their own, on the features sent.
    init = dict(req["init"], input_dims=tuple(req["init"]["input_dims"]))
    graph = CrossScaleFlow(**init)
    state = {k[len("graph."):]: v for k, v in req["state"].items()}
    load(graph, state, notes)
    maps = AnomalyMapGenerator(input_dims=init["input_dims"], mode=AnomalyMapMode.ALL)
    graph.eval()
    with torch.no_grad():
        z, jac = graph(req["inputs"]["test"])
    outputs = {"z": torch.cat([zi.flatten(1) for zi in z], 1), "log_jac_sum": jac,
               "score": CsFlowModel._compute_anomaly_scores(z), "anomaly_map": maps(z)[:, 0]}
    graph.train()
    graph.zero_grad(set_to_none=True)
    loss = CsFlowLoss()(*graph(req["inputs"]["train"]))
    loss.backward()
    outputs["loss"] = loss.detach()
    return outputs, {f"graph.{k}": v for k, v in grads_of(graph).items()}


def cflow(req, notes):
    from anomalib.models.image.cflow.torch_model import CflowModel

    model = CflowModel(pre_trained=False, **req["init"])
    load(model, req["state"], notes)
    model.eval()
    with torch.no_grad():
        out = model(req["inputs"]["test"])
    amap = out.anomaly_map[:, 0] if out.anomaly_map.dim() == 4 else out.anomaly_map
    return {"anomaly_map-min": amap - amap.min(), "score-min": out.pred_score.reshape(-1) - amap.min()}


def ganomaly(req, notes):
    from anomalib.models.image.ganomaly.loss import DiscriminatorLoss, GeneratorLoss
    from anomalib.models.image.ganomaly.torch_model import GanomalyModel

    model = GanomalyModel(**dict(req["init"], input_size=tuple(req["init"]["input_size"])))
    load(model, req["state"], notes)
    model.eval()
    with torch.no_grad():
        outputs = {"score": model(req["inputs"]["test"]).pred_score.reshape(-1)}
    # anomalib's Ganomaly.training_step, the optimizer steps left out (they come after each backward)
    generator_loss, discriminator_loss = GeneratorLoss(**req["weights"]), DiscriminatorLoss()
    model.train()
    model.zero_grad(set_to_none=True)
    padded, fake, latent_i, latent_o = model(req["inputs"]["train"])
    pred_real, _ = model.discriminator(padded)
    pred_fake, _ = model.discriminator(fake)
    g_loss = generator_loss(latent_i, latent_o, padded, fake, pred_real, pred_fake)
    g_loss.backward(retain_graph=True)
    grads = {f"generator.{n}": p.grad.clone() for n, p in model.generator.named_parameters()}
    model.discriminator.zero_grad(set_to_none=True)
    pred_fake, _ = model.discriminator(fake.detach())
    d_loss = discriminator_loss(pred_real, pred_fake)
    d_loss.backward()
    grads.update({f"discriminator.{n}": p.grad.clone() for n, p in model.discriminator.named_parameters()})
    outputs.update(generator_loss=g_loss.detach(), discriminator_loss=d_loss.detach())
    return outputs, grads


def reverse_distillation(req, notes):
    from anomalib.models.image.reverse_distillation.loss import ReverseDistillationLoss
    from anomalib.models.image.reverse_distillation.torch_model import ReverseDistillationModel

    init = dict(req["init"], input_size=tuple(req["init"]["input_size"]))
    model = ReverseDistillationModel(pre_trained=False, **init)
    load(model, {**req["state"], "__unused__": req["anomalib_unused"]}, notes)
    notes.append(f"anomalib parameters never called in its forward, left at init: {req['anomalib_unused']}")
    loss = ReverseDistillationLoss()
    return _eval_then_train(model, req, lambda out: loss(*out))


SIDES = {"reverse_distillation": reverse_distillation, "ganomaly": ganomaly, "cflow": cflow, "csflow": csflow, "uflow": uflow, "padim": padim, "patchcore": patchcore, "dfm": dfm, "dfkde": dfkde, "stfpm": stfpm,
         "fastflow": fastflow}


def main(argv: list[str]) -> int:
    root, models = Path(argv[0]), argv[1:]
    torch.set_num_threads(int(os.environ.get("PARITY_THREADS", "2")))
    _no_pretrained_timm()
    import anomalib

    for name in models:
        notes: list[str] = []
        start = time.perf_counter()
        response = {"outputs": {}, "grads": {}, "notes": notes, "error": None, "anomalib": anomalib.__version__}
        try:
            req = torch.load(root / name / "request.pt", map_location="cpu", weights_only=True)
            torch.manual_seed(int(req.get("seed", 0)))
            result = SIDES[name](req, notes)
            if isinstance(result, tuple):
                response["outputs"], response["grads"] = result
            else:
                response["outputs"] = result
        except Exception as error:  # one model's failure is its rows' note, not the end of the run
            response["error"] = f"{type(error).__name__}: {error}"
            response["traceback"] = traceback.format_exc()
        response["seconds"] = round(time.perf_counter() - start, 2)
        response["outputs"] = {k: v.detach().contiguous().clone() for k, v in response["outputs"].items()}
        response["grads"] = {k: v.detach().contiguous().clone() for k, v in response["grads"].items()}
        tmp = root / name / f"response.pt.tmp{os.getpid()}"
        torch.save(response, tmp)
        os.replace(tmp, root / name / "response.pt")
        print(f"[parity:anomalib] {name}: {'error: ' + response['error'] if response['error'] else 'ok'} "
              f"({response['seconds']} s)", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
