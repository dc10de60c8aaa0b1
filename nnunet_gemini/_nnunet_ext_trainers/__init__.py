"""Trainer-shim directory that the installed .pth appends to nnUNet_extTrainer.

nnU-Net imports every module here as a TOP-LEVEL module during its trainer search, so the
modules have unique names and only re-export classes from nnunet_gemini.trainers (the classes
keep their canonical module). This file itself is never imported by nnU-Net.
"""
