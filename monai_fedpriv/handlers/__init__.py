"""Ignite event handlers that add federated sync, privacy and leakage evaluation to a MONAI trainer."""

from monai_fedpriv.handlers.attack_evaluator import ReconstructionAttackEvaluator
from monai_fedpriv.handlers.dp_budget import PrivacyBudgetHandler
from monai_fedpriv.handlers.federated_sync import FederatedSync

__all__ = ["FederatedSync", "PrivacyBudgetHandler", "ReconstructionAttackEvaluator"]
