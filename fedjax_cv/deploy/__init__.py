"""Deployment of fedjax_cv experiments across organisations (`fedjax_cv.deploy.flower`).

Importing this package needs nothing beyond fedjax_cv; `fedjax_cv.deploy.flower` imports
Flower (`pip install "fedjax_cv[deploy]"`) only when an app is built.
"""
