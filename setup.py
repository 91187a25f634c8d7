"""Packaging for fusion: installs ``fusion`` and ``fusion.kernels`` (from ``kernels/``)."""
from setuptools import setup

setup(
    name="fusion-tower",
    version="0.1.0",
    description="Multi-encoder (CLIP, SigLIP, SAM, DINOv2) vision tower with Triton token-merging kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",  # torch>=2.10 and transformers 5 need 3.10
    packages=["fusion", "fusion.encoders", "fusion.kernels"],
    package_dir={"fusion": "fusion", "fusion.kernels": "kernels"},
    package_data={"fusion": ["configs/*.yaml"]},
    # Ranges: the lower bound of each library fusion reads beyond its most stable API
    # (open_clip, timm, transformers) is the oldest release CI tests (.ci/run reruns the encoder
    # and HF tests at the bounds, read from this file by .ci/lower_bounds.py). No upper bounds:
    # add one only for a known break, with the reason beside it.
    install_requires=[
        # torch>=2.10: the oldest release the suite passes on (checked by hand on 2.8, 2.10, 2.12:
        # on 2.8 FSDP2's CPU path lacks Stream.record_event, which test_distributed needs). On
        # 2.10 (Triton 3.6) the Triton-interpreter tests also need numpy<2.4.
        "torch>=2.10",
        "torchvision>=0.25",
        # open-clip-torch>=3.0 with timm>=1.0.17: together they pass encoders.<name>.image_size
        # down to timm-based towers (SigLIP); older pairs build those at their native size.
        # open_clip's VisionTransformer.forward_intermediates is absent up to 2.31.
        "timm>=1.0.17",
        "open-clip-torch>=3.0",
        # huggingface_hub>=1.5: checkpoint caches (tags, hf:<repo>, fusion-tower download); the
        # oldest release transformers 5.4 accepts, so CI tests both bounds together
        "huggingface_hub>=1.5",
        "segment-anything>=1.0",
        "triton>=3.0; platform_system == 'Linux'",
        "einops>=0.7",
        "pyyaml>=6.0",
        "safetensors>=0.4",
        "pillow>=10.0",
        "tqdm>=4.60",
        "numpy>=1.24",
    ],
    extras_require={
        # transformers in dev so CI runs tests/test_hf.py (it is skipped without it).
        # transformers>=5.4: AutoImageProcessor.register(image_processor_classes=...) (fusion.hf);
        # 5.0-5.3 lack it.
        "dev": ["pytest>=7.4", "hypothesis>=6.90", "transformers>=5.4"],
        "hf": ["transformers>=5.4"],  # fusion.hf; config.json of Hugging Face checkpoints
        "bench": ["matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["fusion-tower=fusion.cli:main"]},
)
