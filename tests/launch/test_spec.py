"""SlurmSpec: wall-time parsing, one task per GPU, and each cluster's rules."""

from __future__ import annotations

import pytest

from cryo_lightning.io.errors import InputError
from cryo_lightning.launch.clusters import CLUSTERS, get_cluster
from cryo_lightning.launch.spec import SlurmSpec, parse_time


@pytest.mark.parametrize("text, minutes", [("12:00:00", 720), ("2-00:00:00", 2880), ("0-04:30:00", 270),
                                           ("00:00:30", 1), ("1:30:01", 91), ("168:00:00", 10080)])
def test_parse_time(text, minutes):
    assert parse_time(text) == minutes


@pytest.mark.parametrize("text", ["90", "12:00", "1:60:00", "2-3", "soon"])
def test_parse_time_rejects_other_forms(text):
    with pytest.raises(InputError, match="--time"):
        parse_time(text)


def test_one_task_per_gpu():
    assert SlurmSpec(gpus_per_node=4).tasks == 4
    assert SlurmSpec(cluster="local", gpus_per_node=0).tasks == 1
    assert SlurmSpec(cluster="local", gpus_per_node=0, tasks_per_node=2).tasks == 2
    with pytest.raises(InputError, match="one task per GPU"):
        SlurmSpec(gpus_per_node=4, tasks_per_node=2).validate()


@pytest.mark.parametrize("cluster", ["arrhenius", "berzelius", "alvis"])
def test_naiss_clusters_need_an_account(cluster):
    with pytest.raises(InputError, match="--account"):
        SlurmSpec(cluster=cluster).validate()
    assert SlurmSpec(cluster=cluster, account="proj").validate() == []


def test_impossible_requests_fail_before_submission():
    with pytest.raises(InputError, match="at most 8 GPUs"):
        SlurmSpec(cluster="berzelius", account="a", gpus_per_node=16).validate()
    with pytest.raises(InputError, match="--nodes must be 1"):
        SlurmSpec(cluster="local", nodes=2, gpus_per_node=0).validate()
    with pytest.raises(InputError, match="one task in this process"):
        SlurmSpec(cluster="debug", gpus_per_node=0, tasks_per_node=2).validate()
    with pytest.raises(InputError, match="request GPUs"):
        SlurmSpec(cluster="generic", gpus_per_node=0).validate()
    with pytest.raises(InputError, match="no time to train"):
        SlurmSpec(time="00:03:00", signal_delay=120).validate()
    with pytest.raises(InputError, match="unknown cluster"):
        get_cluster("kebnekaise")


def test_doubtful_requests_warn():
    warnings = SlurmSpec(cluster="berzelius", account="a", time="5-00:00:00").validate()
    assert any("longer than 3-00:00:00" in w for w in warnings)
    assert any("--gpu-type is ignored" in w for w in SlurmSpec(gpu_type="A100").validate())


def test_cpus_per_task_follow_the_gpu_type():
    assert SlurmSpec(cluster="alvis", account="a").cpus == 16  # default A100
    assert SlurmSpec(cluster="alvis", account="a", gpu_type="T4").cpus == 4
    assert SlurmSpec(cluster="alvis", account="a", gpu_type="T4", cpus_per_task=2).cpus == 2
    assert SlurmSpec(cluster="alvis", account="a").gpu_type_or_default == "A100"
    assert all(preset.cpus_for(None) >= 1 for preset in CLUSTERS.values())
