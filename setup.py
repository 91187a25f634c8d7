"""Packaging for fusion: installs ``fusion`` and ``fusion.kernels`` (from ``kernels/``)."""
from setuptools import setup

setup(
    name="fusion-tower",
    version="0.1.0",
    description="Multi-encoder (CLIP, SigLIP, SAM, DINOv2) vision tower with Triton token-merging kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["fusion", "fusion.encoders", "fusion.kernels"],
    package_dir={"fusion": "fusion", "fusion.kernels": "kernels"},
    package_data={"fusion": ["configs/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "timm>=1.0.9",
        "open-clip-torch>=2.26",
        "huggingface_hub>=0.23",  # checkpoint caches: tags, hf:<repo>, fusion-tower download
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
        # transformers in dev so CI runs tests/test_hf.py (it is skipped without it)
        "dev": ["pytest>=7.4", "hypothesis>=6.90", "transformers>=5.0"],
        "hf": ["transformers>=5.0"],  # fusion.hf; and config.json of Hugging Face checkpoints
        "bench": ["matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["fusion-tower=fusion.cli:main"]},
)
