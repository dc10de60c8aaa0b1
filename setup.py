"""nnunet-gemini: GEMINI (homeomorphism-prior dense contrastive learning) for nnU-Net v2.

Layout (design card): nnunet_gemini/ is the library, trainers/ and pretraining/ are installed
as nnunet_gemini.trainers and nnunet_gemini.pretraining so the package owns ONE import
namespace. A .pth file puts our trainer-shim directory on nnUNet_extTrainer at interpreter
start, so plain `nnUNetv2_train -tr nnUNetTrainerGEMINI` finds the trainers.
"""
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH_NAME = "nnunet_gemini_ext_trainers.pth"
HERE = os.path.dirname(os.path.abspath(__file__))


class build_py_with_pth(build_py):
    """Copy the .pth next to the packages (the wheel's purelib root).

    setuptools' editable_wheel also runs build_py and ships what lands in build_lib's root,
    so the same hook serves `pip install .` and `pip install -e .`; pip records the file and
    `pip uninstall` removes it.
    """

    def run(self):
        super().run()
        os.makedirs(self.build_lib, exist_ok=True)
        shutil.copyfile(os.path.join(HERE, "nnunet_gemini", PTH_NAME),
                        os.path.join(self.build_lib, PTH_NAME))

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH_NAME)]


class editable_wheel_with_pth(editable_wheel):
    """`pip install -e .`: setuptools builds the editable wheel from its own file list and
    drops extra .pth files; everything in the unpacked-wheel folder is shipped, so put it there.
    (Uses a private setuptools hook; tests/test_install.py covers both install kinds.)"""

    def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):
        result = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
        shutil.copyfile(os.path.join(HERE, "nnunet_gemini", PTH_NAME),
                        os.path.join(unpacked_wheel, PTH_NAME))
        return result


setup(
    name="nnunet-gemini",
    version="0.1.0",
    description="GEMINI homeomorphism-prior self-supervised pre-training and semi-supervised "
                "training for nnU-Net v2",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    if os.path.isfile(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "nnunet_gemini",
        "nnunet_gemini._nnunet_ext_trainers",
        "nnunet_gemini.trainers",
        "nnunet_gemini.pretraining",
    ],
    package_dir={
        "nnunet_gemini": "nnunet_gemini",
        "nnunet_gemini.trainers": "trainers",
        "nnunet_gemini.pretraining": "pretraining",
    },
    include_package_data=False,
    install_requires=[
        "nnunetv2>=2.8.1,<2.9",
        "torch>=2.1",
        "dynamic-network-architectures",
        "batchgenerators",
        "batchgeneratorsv2",
        "SimpleITK",
        "nibabel",
        "acvl-utils",
        "matplotlib",
        "tqdm",
        "numpy",
    ],
    extras_require={"test": ["pytest", "hypothesis", "ruff"]},
    entry_points={
        "console_scripts": [
            "gemini_doctor=nnunet_gemini.doctor:main",
            "gemini_demo_dataset=nnunet_gemini.demo_data:main",
            "gemini_demo=nnunet_gemini.demo:main",
            "gemini_pretrain=nnunet_gemini.pretraining.run_pretraining:main",
            "gemini_fewshot_split=nnunet_gemini.fewshot_split:main",
            "gemini_register=nnunet_gemini.register:main",
            "gemini_benchmark=nnunet_gemini.benchmark:main",
        ]
    },
    cmdclass={"build_py": build_py_with_pth, "editable_wheel": editable_wheel_with_pth},
    zip_safe=False,
)
