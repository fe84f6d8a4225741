"""Layer-level losses (balance, z-loss, ReMoE L1, ERC, DPSL, BlockFFN ALL/CSL, SMILE group balance, LocMoE node
locality, CompeteSMoE distillation) and the aux-loss injector."""
from .attach import inject_aux_loss
from .balance import (GlobalBatchAuxLoss, SequenceAuxLoss, SwitchAuxLoss, ZLoss, sequence_aux_loss,
                      switch_aux_loss, z_loss)
from .base import Loss, LossInputs, LossOutput
from .betainc import betainc
from .blockffn import (ActivationLocalityLoss, ChunkSparsificationLoss, activation_locality_loss,
                       chunk_sparsification_loss)
from .bilevel import GroupBalanceLoss, group_balance_loss
from .compete import CompeteDistillLoss, compete_distill_loss
from .dpsl import DPSLoss, dpsl_loss
from .erc import ERCLoss, erc_loss
from .l1 import ReLUL1Loss, relu_l1_loss
from .node_locality import NodeLocalityLoss, local_mass, node_locality_loss
from .pooled import hf_load_balancing_loss

__all__ = ["Loss", "LossInputs", "LossOutput", "SwitchAuxLoss", "SequenceAuxLoss", "GlobalBatchAuxLoss", "ZLoss",
           "switch_aux_loss", "sequence_aux_loss", "z_loss", "inject_aux_loss", "ReLUL1Loss",
           "relu_l1_loss", "ERCLoss", "erc_loss", "DPSLoss", "dpsl_loss", "betainc",
           "ActivationLocalityLoss", "ChunkSparsificationLoss", "activation_locality_loss",
           "chunk_sparsification_loss", "hf_load_balancing_loss", "CompeteDistillLoss", "compete_distill_loss",
           "GroupBalanceLoss", "group_balance_loss",
           "NodeLocalityLoss", "node_locality_loss", "local_mass"]
