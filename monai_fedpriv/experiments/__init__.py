"""Experiment recipes built on the simulator: the federated run with baselines (:mod:`.federated`), a team's own
MSD/BraTS data in one flag (:mod:`.own_data`), the DP table (:mod:`.privacy_table`) and the sharing study
(:mod:`.sharing_study`)."""

from monai_fedpriv.experiments.federated import SiteSplit, bundle_datalist, run_experiment, split_sites

__all__ = ["SiteSplit", "bundle_datalist", "run_experiment", "split_sites"]
