# Kestrel on the cluster, through the cloud-agnostic module: the profile's values, the image by digest, gp3 volumes,
# backups to the backups bucket through IRSA, devices allowed from `device_cidrs`. The operators (CloudNativePG, the
# Prometheus Operator, OpenBao) and the Secrets the chart reads are installed before it (README, "Deploy").
module "kestrel" {
  source                      = "../../modules/kestrel"
  profile                     = var.profile
  image_repository            = var.image_repository
  image_digest                = var.image_digest
  storage_class               = kubernetes_storage_class_v1.gp3.metadata[0].name
  backup_bucket               = "s3://${module.backups_bucket.id}/postgres"
  backup_role_arn             = module.backup_role.arn
  load_balancer_source_ranges = var.device_cidrs
  extra_values = yamlencode({
    database = { cnpg = { serviceAccountTemplate = { metadata = { annotations = {
      "eks.amazonaws.com/role-arn" = module.backup_role.arn
    } } } } }
  })
}
