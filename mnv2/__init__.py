"""The library behind the scripts at the repository's root: MobileNetV2's data, training, scoring and deployment.

The base modules here (`cli`, `outputs`, `checkpoint`, `distributed`, `weights`, `scoring`, `evaluation`) serve
every stage; `data`, `training` and `deploy` hold one stage each. docs/architecture.md draws the layering.
"""
