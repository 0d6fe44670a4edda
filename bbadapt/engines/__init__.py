"""Detector engines: the MXNet/GluonCV one (gluon/); each reads bundles through bbadapt.bundle."""
