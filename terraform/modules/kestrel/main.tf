# Installs Kestrel's chart on any Kubernetes cluster (issue 15, ADR-0025). Prerequisites in the cluster: the
# CloudNativePG operator, the Prometheus Operator's CRDs, and the Secrets the chart reads (README, "Deploy").
resource "kubernetes_namespace" "kestrel" {
  metadata {
    name = var.namespace
    labels = {
      "app.kubernetes.io/part-of"          = "kestrel"
      "pod-security.kubernetes.io/enforce" = "restricted"
    }
  }
}

locals {
  profile_values = file("${var.chart_path}/values-${var.profile}.yaml")
  platform_values = yamlencode({
    image = {
      repository = var.image_repository
      digest     = var.image_digest
    }
    emqx = {
      storage = { storageClass = var.storage_class }
      service = { loadBalancerSourceRanges = var.load_balancer_source_ranges }
    }
    nats = {
      storage = { storageClass = var.storage_class }
    }
    database = {
      cnpg = {
        storage = { storageClass = var.storage_class }
        backup = {
          destinationPath   = var.backup_bucket
          credentialsSecret = var.backup_role_arn == "" ? "kestrel-backup-s3" : ""
        }
      }
    }
  })
}

resource "helm_release" "kestrel" {
  name             = var.release_name
  namespace        = kubernetes_namespace.kestrel.metadata[0].name
  chart            = var.chart_path
  create_namespace = false
  atomic           = true
  cleanup_on_fail  = true
  timeout          = 1200
  wait             = true
  values           = compact([local.profile_values, local.platform_values, var.extra_values])
}
