"""Layer-level losses (balance, z-loss) and the aux-loss injector."""
from .attach import inject_aux_loss
from .l1 import ReLUL1Loss, relu_l1_loss
from .balance import (GlobalBatchAuxLoss, Loss, LossInputs, SequenceAuxLoss, SwitchAuxLoss, ZLoss,
                      sequence_aux_loss, switch_aux_loss, z_loss)

__all__ = ["Loss", "LossInputs", "SwitchAuxLoss", "SequenceAuxLoss", "GlobalBatchAuxLoss", "ZLoss",
           "switch_aux_loss", "sequence_aux_loss", "z_loss", "inject_aux_loss", "ReLUL1Loss",
           "relu_l1_loss"]
