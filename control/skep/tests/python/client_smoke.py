"""Drives a skep API server with the official Python `kubernetes` client.

Usage: python3 client_smoke.py KUBECONFIG NAMESPACE
Exits non-zero (with the failing assertion) when the client does not get
the behaviour a real cluster gives it.
"""
import sys
import threading
import time

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException


def main(kubeconfig: str, ns: str) -> None:
    config.load_kube_config(config_file=kubeconfig)
    core = client.CoreV1Api()
    apps = client.AppsV1Api()

    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    assert ns in [n.metadata.name for n in core.list_namespace().items]

    # Create with typed models, list with label selectors.
    for i, tier in enumerate(["fe", "fe", "be"]):
        core.create_namespaced_config_map(ns, client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name=f"cm-{i}", labels={"tier": tier, "app": "py"}),
            data={"i": str(i)}))
    fe = core.list_namespaced_config_map(ns, label_selector="tier=fe")
    assert sorted(c.metadata.name for c in fe.items) == ["cm-0", "cm-1"], fe.items
    notfe = core.list_namespaced_config_map(ns, label_selector="app=py,tier notin (fe)")
    assert [c.metadata.name for c in notfe.items] == ["cm-2"]
    by_name = core.list_namespaced_config_map(ns, field_selector="metadata.name=cm-1")
    assert [c.metadata.name for c in by_name.items] == ["cm-1"]

    # Pagination with limit/continue.
    page1 = core.list_namespaced_config_map(ns, limit=2)
    assert len(page1.items) == 2 and page1.metadata._continue
    page2 = core.list_namespaced_config_map(ns, limit=2, _continue=page1.metadata._continue)
    assert len(page2.items) == 1 and not page2.metadata._continue

    # Watch from the list's resourceVersion sees a later change.
    rv = core.list_namespaced_config_map(ns).metadata.resource_version
    seen = []

    def watcher():
        w = watch.Watch()
        for ev in w.stream(core.list_namespaced_config_map, ns, resource_version=rv, timeout_seconds=10):
            seen.append((ev["type"], ev["object"].metadata.name))
            if ev["type"] == "DELETED":
                w.stop()

    t = threading.Thread(target=watcher)
    t.start()
    time.sleep(0.5)
    core.patch_namespaced_config_map("cm-0", ns, {"data": {"patched": "yes"}})
    core.delete_namespaced_config_map("cm-2", ns)
    t.join(15)
    assert ("MODIFIED", "cm-0") in seen and ("DELETED", "cm-2") in seen, seen
    assert core.read_namespaced_config_map("cm-0", ns).data["patched"] == "yes"

    # Deployments: create, scale subresource, strategic merge patch.
    dep = client.V1Deployment(
        metadata=client.V1ObjectMeta(name="web"),
        spec=client.V1DeploymentSpec(
            replicas=2,
            selector=client.V1LabelSelector(match_labels={"app": "web"}),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels={"app": "web"}),
                spec=client.V1PodSpec(containers=[client.V1Container(name="web", image="host")]))))
    apps.create_namespaced_deployment(ns, dep)
    apps.patch_namespaced_deployment_scale("web", ns, {"spec": {"replicas": 4}})
    assert apps.read_namespaced_deployment("web", ns).spec.replicas == 4
    apps.patch_namespaced_deployment("web", ns, {"spec": {"template": {"spec": {"containers": [
        {"name": "side", "image": "host"}]}}}})
    names = [c.name for c in apps.read_namespaced_deployment("web", ns).spec.template.spec.containers]
    assert names == ["web", "side"], names

    # Errors are Status objects with the right codes.
    try:
        core.create_namespaced_config_map(ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="cm-0")))
        raise AssertionError("duplicate create succeeded")
    except ApiException as e:
        assert e.status == 409, e
    try:
        core.read_namespaced_config_map("missing", ns)
        raise AssertionError("read of a missing object succeeded")
    except ApiException as e:
        assert e.status == 404, e
    try:
        core.create_namespaced_config_map(ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="Bad_Name")))
        raise AssertionError("invalid name accepted")
    except ApiException as e:
        assert e.status == 422, e

    # Custom resources: a CRD, then objects of its kind validated against
    # its schema.
    ext = client.ApiextensionsV1Api()
    crd_name = f"widgets{ns}.example.com"
    ext.create_custom_resource_definition({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": crd_name},
        "spec": {"group": "example.com", "scope": "Namespaced",
                 "names": {"plural": f"widgets{ns}", "singular": f"widget{ns}", "kind": f"Widget{ns.capitalize()}"},
                 "versions": [{"name": "v1", "served": True, "storage": True,
                               "schema": {"openAPIV3Schema": {"type": "object", "properties": {"spec": {
                                   "type": "object", "required": ["size"],
                                   "properties": {"size": {"type": "integer", "minimum": 1},
                                                  "color": {"type": "string", "default": "blue"}}}}}}}]}})
    crd = ext.read_custom_resource_definition(crd_name)
    assert any(c.type == "Established" and c.status == "True" for c in crd.status.conditions)
    co = client.CustomObjectsApi()
    body = {"apiVersion": "example.com/v1", "kind": f"Widget{ns.capitalize()}", "metadata": {"name": "w1"},
            "spec": {"size": 2}}
    co.create_namespaced_custom_object("example.com", "v1", ns, f"widgets{ns}", body)
    got = co.get_namespaced_custom_object("example.com", "v1", ns, f"widgets{ns}", "w1")
    assert got["spec"] == {"size": 2, "color": "blue"}, got
    co.patch_namespaced_custom_object("example.com", "v1", ns, f"widgets{ns}", "w1", {"spec": {"size": 5}})
    listed = co.list_namespaced_custom_object("example.com", "v1", ns, f"widgets{ns}")
    assert [i["spec"]["size"] for i in listed["items"]] == [5]
    try:
        bad = dict(body, metadata={"name": "w2"}, spec={"size": 0})
        co.create_namespaced_custom_object("example.com", "v1", ns, f"widgets{ns}", bad)
        raise AssertionError("a widget violating the schema was accepted")
    except ApiException as e:
        assert e.status == 422, e
    co.delete_namespaced_custom_object("example.com", "v1", ns, f"widgets{ns}", "w1")
    ext.delete_custom_resource_definition(crd_name)

    core.delete_namespace(ns)
    print("python client: all checks passed")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
