# Object storage: PostgreSQL's base backups and WAL (CloudNativePG's barman-cloud), and OTA artifacts. Private,
# versioned, encrypted with the storage key, TLS only; old versions expire. The database pods write backups through
# IRSA (no static credentials); OpenBao unseals with the unseal key through IRSA.
module "backups_bucket" {
  source  = "./bucket"
  name    = "${var.name}-backups-${data.aws_caller_identity.current.account_id}"
  kms_key = aws_kms_key.storage.arn
}

module "ota_bucket" {
  source  = "./bucket"
  name    = "${var.name}-ota-${data.aws_caller_identity.current.account_id}"
  kms_key = aws_kms_key.storage.arn
}

module "backup_role" {
  source          = "./irsa"
  name            = "${var.name}-db-backup"
  oidc_issuer     = aws_eks_cluster.this.identity[0].oidc[0].issuer
  oidc_arn        = aws_iam_openid_connect_provider.this.arn
  service_account = "kestrel:k-kestrel-db"
  inline_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Effect   = "Allow"
        Action   = ["s3:PutObject", "s3:GetObject", "s3:DeleteObject", "s3:ListBucket", "s3:GetBucketLocation"]
        Resource = [module.backups_bucket.arn, "${module.backups_bucket.arn}/*"]
      },
      { Effect = "Allow", Action = ["kms:Encrypt", "kms:Decrypt", "kms:GenerateDataKey*"], Resource = aws_kms_key.storage.arn },
    ]
  })
}

module "unseal_role" {
  source          = "./irsa"
  name            = "${var.name}-openbao-unseal"
  oidc_issuer     = aws_eks_cluster.this.identity[0].oidc[0].issuer
  oidc_arn        = aws_iam_openid_connect_provider.this.arn
  service_account = "openbao:openbao"
  inline_policy = jsonencode({
    Version   = "2012-10-17"
    Statement = [{ Effect = "Allow", Action = ["kms:Encrypt", "kms:Decrypt", "kms:DescribeKey"], Resource = aws_kms_key.unseal.arn }]
  })
}
