"""Deploy ``to: tmpfs``: download the job's images for a QEMU board, with the test overlay."""

from __future__ import annotations

import voluptuous as v

from agent.actions.deploy.download import IMAGE_KEYS, DownloaderAction, QCowConversionAction, download_together
from agent.actions.deploy.guest import ApplyOverlayGuest
from agent.actions.deploy.overlay import DeployDeviceEnvironment, OverlayAction
from agent.device import Needs
from agent.pipeline import Action, register
from agent.schema import action_base


@register("deploy", "tmpfs")
class DeployImagesAction(Action):
    """Download each image; build the test overlay and put it in a cpio ramdisk
    (``overlays: {lava: true}``) or on a guest disk."""

    name = "deployimages"
    description = "deploy images using guestfs"
    summary = "deploy images"
    needs = Needs(deploy_method="image",
                  why="deploy to tmpfs needs a device with the 'image' deploy method (a QEMU device)")

    @classmethod
    def schema(cls) -> dict:
        return {
            **action_base(),
            v.Required("to"): "tmpfs",
            v.Required("images"): v.All({str: IMAGE_KEYS}, v.Length(min=1, msg="'images' is empty")),
            v.Optional("os"): str,
            v.Optional("type"): "monitor",
            v.Optional("uefi"): IMAGE_KEYS,
        }

    def validate(self) -> None:
        super().validate()
        if "uefi" in self.parameters:
            self.errors.append("not implemented: deploy 'uefi' firmware")

    def populate(self, parameters: dict) -> None:
        pipeline = self.child_pipeline(parameters)
        images = parameters["images"]
        has_tests = bool(self.context.tests_after)
        lava_in_image = any((image.get("overlays") or {}).get("lava") for image in images.values())
        if has_tests:
            pipeline.add(OverlayAction())
            # LAVA keeps it when the overlay goes into a ramdisk (and does nothing): so do we, for its level
            pipeline.add(ApplyOverlayGuest(into_ramdisk=lava_in_image))
            pipeline.add(DeployDeviceEnvironment())
        # the overlay is built first, so a ramdisk that carries it gets it right after download
        for key, image in images.items():
            pipeline.add(DownloaderAction(key, image))
            if image.get("format") == "qcow2":
                pipeline.add(QCowConversionAction(key))
        download_together(pipeline)
