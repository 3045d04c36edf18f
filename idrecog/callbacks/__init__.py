"""Lightning callbacks."""

from idrecog.callbacks.mae_images import MAEReconstructionImages, make_reconstruction_grid

__all__ = ["MAEReconstructionImages", "make_reconstruction_grid"]
