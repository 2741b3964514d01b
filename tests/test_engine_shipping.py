"""What --engine ray ships to its actors: the task without the model's weights."""

from __future__ import annotations

import pickle

import pytest

pytest.importorskip("ray")


def test_the_task_travels_without_the_model_and_binds_to_the_actors_own():
    from visbatch.core.engines.ray_data import load_from_recipe, model_recipe, receive_task, ship_task
    from visbatch.core.errors import FatalError
    from visbatch.core.models import DeviceOnly, load_model
    from visbatch.core.tasks.classify import ClassifyTask

    driver = load_model("test-tiny-cnn", device="cpu")
    task = ClassifyTask(driver, top_k=2)
    payload = ship_task(task, driver)
    weights = sum(p.numel() * p.element_size() for p in driver.module.parameters())
    assert len(payload) < 2000 < weights, (len(payload), weights)  # references, not the weights
    with pytest.raises(pickle.UnpicklingError):
        pickle.loads(payload)  # a plain unpickler cannot resolve the model's references
    actor = load_from_recipe(model_recipe(driver), "cpu")
    shipped = receive_task(payload, actor)
    assert shipped.model is actor and shipped._classifier is actor.module.get_classifier()
    assert shipped.top_k == 2
    recipe = model_recipe(driver)
    recipe["checksum"] = "0" * 64
    with pytest.raises(FatalError, match="other weights"):
        load_from_recipe(recipe, "cpu")
    pixels = model_recipe(DeviceOnly("cpu"))
    assert pixels["device_only"] and isinstance(load_from_recipe(pixels, "cpu"), DeviceOnly)
