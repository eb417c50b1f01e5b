"""GANomaly: our state dict (or gradients) -> anomalib 2.7's GanomalyModel.

The networks are the same DCGAN layers in the same order; ours are named by position (nn.Sequential indices),
anomalib's by their shapes ('pyramid-64-128-conv'), so each of our modules is renamed from its weight's shape.
Covers extra_layers=0 (the default); other shapes raise."""

from __future__ import annotations

import re


def _module_names(state: dict) -> dict[str, str]:
    """Our module path -> anomalib's, from the shapes of the modules' weights."""
    names = {}
    weights = {k[: -len(".weight")]: v for k, v in state.items() if k.endswith(".weight")}
    decoder = sorted((int(m.rsplit(".", 1)[1]) for m in weights if m.startswith("generator.decoder.layers.")))
    for module, w in weights.items():
        enc = re.fullmatch(r"generator\.(encoder[12])\.features\.(\d+)", module)
        dec = re.fullmatch(r"generator\.decoder\.layers\.(\d+)", module)
        if enc:
            head, index = f"generator.{enc.group(1)}.", int(enc.group(2))
            if w.dim() == 1:
                names[module] = f"{head}pyramid_features.pyramid-{w.shape[0]}-batchnorm"
            elif index == 0:
                names[module] = f"{head}input_layers.initial-conv-{w.shape[1]}-{w.shape[0]}"
            else:
                names[module] = f"{head}pyramid_features.pyramid-{w.shape[1]}-{w.shape[0]}-conv"
        elif re.fullmatch(r"generator\.encoder[12]\.final", module):
            names[module] = module.replace(".final", ".final_conv_layer")
        elif dec:
            index = int(dec.group(1))
            if w.dim() == 1:
                where = "latent_input.initial" if index == decoder[1] else "inverse_pyramid.pyramid"
                names[module] = f"generator.decoder.{where}-{w.shape[0]}-batchnorm"
            elif index == decoder[0]:  # ConvTranspose2d weights are (in, out, k, k)
                names[module] = f"generator.decoder.latent_input.initial-{w.shape[0]}-{w.shape[1]}-convt"
            elif index == decoder[-1]:
                names[module] = f"generator.decoder.final_layers.final-{w.shape[0]}-{w.shape[1]}-convt"
            else:
                names[module] = f"generator.decoder.inverse_pyramid.pyramid-{w.shape[0]}-{w.shape[1]}-convt"
        elif module.startswith("discriminator."):
            names[module] = module
        else:
            raise KeyError(f"no anomalib name for {module}")
    return names


def to_anomalib(state: dict, reference: dict | None = None) -> dict:
    """`reference`: a full state dict to take the module shapes from (for a dict of gradients, which has no
    buffers; by default `state` itself)."""
    names = _module_names(reference if reference is not None else state)
    out = {}
    for key, value in state.items():
        module, param = key.rsplit(".", 1)
        out[f"{names[module]}.{param}"] = value
    return out
