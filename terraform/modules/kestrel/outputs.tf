output "namespace" {
  description = "The release's namespace."
  value       = kubernetes_namespace.kestrel.metadata[0].name
}

output "mqtt_service" {
  description = "The Service whose load balancer devices connect to (8883 mTLS, 8884 TLS + JWT)."
  value       = "${var.release_name}-kestrel-emqx"
}

output "api_service" {
  description = "The API's Service (port 8080), to publish through the cluster's ingress."
  value       = "${var.release_name}-kestrel-api"
}

output "release_revision" {
  description = "The Helm release's revision."
  value       = helm_release.kestrel.metadata[0].revision
}
