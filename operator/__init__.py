"""kopf operator reconciling GrokDeployment resources into KubeRay RayServices. Never imports torch."""
