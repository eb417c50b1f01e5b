"""PatchCore (Roth et al., CVPR 2022): a memory bank of locally aware patch features, subsampled by
k-center greedy; anomaly = distance of a test patch to its nearest bank entry.

Distributed fit, two ways, both ending with the WHOLE bank of the requested size on every worker:
- "exact" (default): the single-process greedy over the union of all workers' patches, run in place
  (coreset.distributed_k_center_greedy) - the same bank one process would select.
- "two_round" (Malkomes et al., NeurIPS 2015, "Fast distributed k-center clustering with outliers on
  massive data"): every worker picks `n` centers from its own shard, rank 0 picks `n` again from the
  union and broadcasts them; a 4-approximation of the optimal k-center cost (single greedy: 2), with
  only two collectives in all.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ... import distributed
from ..base import AnomalyModel, AnomalyOutput, register_model
from ..components.blur import GaussianBlur2d
from ..components.coreset import distributed_k_center_greedy, k_center_greedy
from ..components.embedding import concat_layers, to_patches
from ..components.sharded_bank import BankShard
from ...progress import progress_bar


@register_model
class PatchCore(AnomalyModel):
    name = "patchcore"
    default_backbone = "wide_resnet50_2"
    default_layers = ("layer2", "layer3")
    defaults = {
        "coreset_sampling_ratio": 0.1,
        "num_neighbors": 9,
        # Random projection used only while selecting the coreset: "auto" = Johnson-Lindenstrauss
        # dimension for eps 0.9 (anomalib's choice), an int to force one, 0 for none.
        "coreset_projection_dim": "auto",
        # Across workers: "exact" = the single-process greedy over all workers' patches, without moving
        # them (one small collective per pick); "two_round" = greedy per worker, then over the union
        # (4-approximation, two collectives in all: for slow links between many nodes).
        "coreset_mode": "exact",
        "query_chunk": 8192,  # rows of test patches per distance GEMM; bounds inference memory
        # How patch scores reach image resolution before the blur: anomalib's "nearest". Measured on
        # Magnetic Tile with the same code and bank: pixel AUROC 0.730 nearest vs 0.733 bilinear (whole
        # split), image AUROC identical (docs/benchmarks.md), so anomalib's default stands.
        "upsample_mode": "nearest",
    }
    # Models saved before upsample_mode existed were bilinear.
    settings_added_later = {"upsample_mode": "bilinear"}
    # Sweep defaults (raylib_ad/tuning/space.py format). Layers in ResNet names, translated by stride.
    # jobs/benchmark.py's configuration (tf_efficientnet_lite0 layers): the reference rows of docs/benchmarks.md
    benchmark_preset = {"settings": {"coreset_sampling_ratio": 0.001, "num_neighbors": 9}, "layers": ["blocks.2", "blocks.4"]}
    test_preset = {"coreset_sampling_ratio": 0.1}  # tests/test_zoo.py: a tiny offline instance
    search_space = {
        "coreset_sampling_ratio": {"loguniform": [0.01, 0.1]},
        "num_neighbors": {"choice": [1, 3, 5, 9]},
        "layers": {"choice": [["layer2", "layer3"], ["layer1", "layer2", "layer3"], ["layer3"]]},
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        ratio = self.settings["coreset_sampling_ratio"]
        self._check_setting("coreset_sampling_ratio", 0 < float(ratio) <= 1, "a number in (0, 1]")
        self._check_setting("num_neighbors", int(self.settings["num_neighbors"]) >= 1, "an integer >= 1")
        self._check_setting("upsample_mode", self.settings["upsample_mode"] in ("bilinear", "nearest"),
                            "'bilinear' or 'nearest' (anomalib's)")
        self._check_setting("coreset_mode", self.settings["coreset_mode"] in ("exact", "two_round"),
                            "'exact' or 'two_round'")
        self.blur = GaussianBlur2d(sigma=4.0)
        self.register_buffer("memory_bank", torch.empty(0))

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, h*w, D) locally aware patch features and the feature grid size (h, w)."""
        features = self.feature_extractor(images)
        # 3x3 neighbourhood average: each patch sees its surroundings (the paper's "local awareness").
        pooled = {k: F.avg_pool2d(v, kernel_size=3, stride=1, padding=1) for k, v in features.items()}
        embedding = concat_layers(pooled, self.layers, mode="bilinear")
        return to_patches(embedding), tuple(embedding.shape[-2:])

    # -- fit -------------------------------------------------------------------------------------
    def fit(self, batches, progress: bool = False) -> None:
        self.eval()
        start = time.perf_counter()
        local = [self.embed(b.to(self.device))[0].flatten(0, 1)
                 for b in progress_bar(batches, desc="patchcore features", enabled=progress)]
        if not local:
            raise RuntimeError("no training images reached this worker: its data shard is empty")
        local = torch.cat(local)
        features_done = time.perf_counter()
        total = int(distributed.all_reduce_sum(torch.tensor([float(local.shape[0])])).item())
        n_bank = self.bank_size(total)
        self.memory_bank = self.select_coreset(local, n_bank, progress)
        self.fit_timings = {"feature_seconds": features_done - start,
                            "coreset_seconds": time.perf_counter() - features_done}

    def bank_size(self, total_patches: int) -> int:
        return max(1, int(total_patches * float(self.settings["coreset_sampling_ratio"])))

    def select_coreset(self, local: torch.Tensor, n_bank: int, progress: bool = False) -> torch.Tensor:
        dim = self.settings["coreset_projection_dim"]
        if distributed.world_size() == 1:
            picked = k_center_greedy(local, n_bank, projection_dim=dim, seed=self.seed, progress=progress)
            return local[picked].contiguous()
        if self.settings["coreset_mode"] == "exact":
            return distributed_k_center_greedy(local, n_bank, projection_dim=dim, seed=self.seed,
                                               progress=progress).contiguous()
        picked = local[k_center_greedy(local, n_bank, projection_dim=dim, seed=self.seed, progress=progress,
                                       desc="coreset (local)")]
        union = distributed.all_gather_rows(picked)
        if distributed.rank() == 0:
            bank = union[k_center_greedy(union, n_bank, projection_dim=dim, seed=self.seed, progress=progress,
                                         desc="coreset (union)")].contiguous()
        else:
            bank = union[:0]
        # Broadcast rather than recompute: bit-identical banks on every worker, whatever the hardware.
        return distributed.broadcast(bank, src=0)

    # -- inference -------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        if self.memory_bank.numel() == 0:
            raise RuntimeError("PatchCore has an empty memory bank: fit() it or load a trained model first")
        patches, grid = self.embed(images)
        return self.score_patches(patches, grid, self.bank_index())

    def bank_index(self) -> BankShard:
        """The whole memory bank as one searchable shard; its row norms are kept while the bank is unchanged."""
        bank = self.memory_bank
        key = (bank.data_ptr(), bank._version, tuple(bank.shape), bank.device)
        if torch.jit.is_tracing() or torch.compiler.is_compiling():  # nothing cached into a traced graph
            return BankShard(bank, query_chunk=int(self.settings["query_chunk"]))
        cached = getattr(self, "_bank_index", None)
        if cached is None or cached[0] != key or cached[1].query_chunk != int(self.settings["query_chunk"]):
            cached = (key, BankShard(bank, query_chunk=int(self.settings["query_chunk"])))
            self._bank_index = cached
        return cached[1]

    def score_patches(self, patches: torch.Tensor, grid: tuple[int, int], bank) -> AnomalyOutput:
        """Scores and maps of (B, h*w, D) patch features against `bank`: this model's own (bank_index()) or
        a ShardedBank over the same rows (components/sharded_bank.py), which gives the same answer."""
        batch, n_patches, _ = patches.shape
        h, w = grid
        dist, idx = bank.search(patches.flatten(0, 1), 1)
        patch_scores = dist[:, 0].view(batch, n_patches)
        locations = idx[:, 0].view(batch, n_patches)
        score = self.reweighted_score(patch_scores, locations, patches, bank)
        return AnomalyOutput(score=score, anomaly_map=self.anomaly_map(patch_scores.view(batch, 1, h, w)))

    def anomaly_map(self, patch_scores: torch.Tensor) -> torch.Tensor:
        """(B, 1, h, w) patch distances -> (B, S, S): upsampling (`upsample_mode`; anomalib: nearest), then
        anomalib's Gaussian blur (sigma 4, kernel 33, reflect padding). Both steps as two small matrix
        products (GaussianBlur2d.upsample_and_blur: equal up to float rounding, ~30x cheaper)."""
        size = (self.image_size, self.image_size)
        return self.blur.upsample_and_blur(patch_scores, size, self.settings["upsample_mode"])[:, 0]

    def reweighted_score(self, patch_scores, locations, patches, bank=None) -> torch.Tensor:
        """Paper eq. 7: damp the max patch distance when its nearest bank entry sits in a dense region."""
        k = int(self.settings["num_neighbors"])
        rows = torch.arange(patch_scores.shape[0], device=patch_scores.device)
        worst = patch_scores.argmax(1)
        score = patch_scores[rows, worst]
        if k == 1:
            return score
        bank = self.bank_index() if bank is None else bank
        worst_features = patches[rows, worst]  # (B, D)
        nn_sample = bank.rows(locations[rows, worst])  # (B, D)
        _, support = bank.search(nn_sample, min(k, len(bank)))
        support_dist = torch.linalg.norm(worst_features.unsqueeze(1) - bank.rows(support).to(worst_features), dim=-1)
        weights = 1 - torch.softmax(support_dist, dim=1)[:, 0]
        return weights * score
