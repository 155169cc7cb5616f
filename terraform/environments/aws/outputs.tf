output "cluster_name" {
  description = "The EKS cluster (aws eks update-kubeconfig --name <this>)."
  value       = aws_eks_cluster.this.name
}

output "backups_bucket" {
  description = "Where PostgreSQL's backups and WAL go."
  value       = module.backups_bucket.id
}

output "ota_bucket" {
  description = "Where OTA artifacts go."
  value       = module.ota_bucket.id
}

output "unseal_key_arn" {
  description = "The KMS key OpenBao's awskms seal uses (with the role below)."
  value       = aws_kms_key.unseal.arn
}

output "unseal_role_arn" {
  description = "The IAM role for OpenBao's service account (openbao/openbao)."
  value       = module.unseal_role.arn
}

output "mqtt_service" {
  description = "The Service whose NLB devices connect to."
  value       = module.kestrel.mqtt_service
}
