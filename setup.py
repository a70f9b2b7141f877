"""Installs the ``sas`` and ``sas_kernels`` packages."""
from setuptools import find_packages, setup

setup(
    name="sas-runtime",
    version="0.1.0",
    description="Fused runtime for SaS adapters: Triton kernels, C++ CPU kernels, reference path, adapter layers",
    packages=find_packages(include=["sas", "sas.*", "sas_kernels", "sas_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy", "safetensors"],
)
