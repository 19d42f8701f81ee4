"""ddpmseg: label-efficient semantic segmentation on frozen diffusion-model features.

The public API (imported lazily, so ``import ddpmseg`` stays cheap):
    create_backbone, list_presets, get_preset, AdmConfig   backbones (one builder for both families)
    ExtractConfig, CacheRecord, ModelRecord                the typed records caches and models store
    FeatureCache, make_noise                               features and their cache
    get_head, list_heads                                   the head registry (fit --head NAME)
    PixelEnsemble, DDPHead                                 the heads: the paper's MLP ensemble; DDP's decoder
    SegmentationModel, StudentModel, load_model            a fitted model folder; a distilled student's; either
    extract_features, fit_model, predict_images,
    evaluate_model, kmeans_grid_image                      the pipeline steps the CLI calls
    anomaly_maps, evaluate_anomaly, suggest_images, merge_caches   anomaly maps, active labelling, caches
    distill, export_onnx                                   a fast student from a model's labels; it as ONNX
    configure_threads                                      torch's CPU threads: call before torch starts
"""

from ddpmseg._lazy import lazy_exports

from ddpmseg._version import __version__
from ddpmseg.errors import DdpmsegError

_EXPORTS = {
    "create_backbone": "ddpmseg.backbones",
    "list_presets": "ddpmseg.backbones",
    "get_preset": "ddpmseg.backbones",
    "AdmConfig": "ddpmseg.backbones",
    "DiffusersConfig": "ddpmseg.backbones",
    "ExtractConfig": "ddpmseg.records",
    "CacheRecord": "ddpmseg.records",
    "ModelRecord": "ddpmseg.records",
    "make_noise": "ddpmseg.features.extractor",
    "FeatureCache": "ddpmseg.features.cache",
    "PixelEnsemble": "ddpmseg.heads.mlp",
    "get_head": "ddpmseg.heads",
    "list_heads": "ddpmseg.heads",
    "DDPHead": "ddpmseg.heads.ddp",
    "SegmentationModel": "ddpmseg.model",
    "extract_features": "ddpmseg.pipeline",
    "fit_model": "ddpmseg.pipeline",
    "predict_images": "ddpmseg.pipeline",
    "evaluate_model": "ddpmseg.pipeline",
    "kmeans_grid_image": "ddpmseg.pipeline",
    "anomaly_maps": "ddpmseg.anomaly.detect",
    "evaluate_anomaly": "ddpmseg.anomaly.metrics",
    "suggest_images": "ddpmseg.active.suggest",
    "merge_caches": "ddpmseg.features.cache",
    "configure_threads": "ddpmseg.runtime",
    "load_model": "ddpmseg.model",
    "StudentModel": "ddpmseg.model",
    "distill": "ddpmseg.distill.run",
    "export_onnx": "ddpmseg.distill.export",
}

__all__ = ["__version__", "DdpmsegError", *_EXPORTS]


__getattr__ = lazy_exports(__name__, _EXPORTS)
