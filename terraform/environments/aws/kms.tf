# Keys: one for the cluster's secrets and the logs, one for the object storage, one for OpenBao's auto-unseal. Each
# rotates yearly and trusts the account's administrators only (roles and services are granted through IAM policies).
locals {
  account_root = "arn:aws:iam::${data.aws_caller_identity.current.account_id}:root"
  key_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      { Sid = "Administrators", Effect = "Allow", Principal = { AWS = local.account_root }, Action = "kms:*", Resource = "*" },
      {
        Sid       = "CloudWatchLogs"
        Effect    = "Allow"
        Principal = { Service = "logs.${var.region}.amazonaws.com" }
        Action    = ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"]
        Resource  = "*"
      },
    ]
  })
}

resource "aws_kms_key" "logs" {
  description         = "${var.name}: EKS secrets and logs"
  enable_key_rotation = true
  policy              = local.key_policy
}

resource "aws_kms_key" "storage" {
  description         = "${var.name}: backups and OTA artifacts"
  enable_key_rotation = true
  policy              = local.key_policy
}

resource "aws_kms_key" "unseal" {
  description         = "${var.name}: OpenBao auto-unseal"
  enable_key_rotation = true
  policy              = local.key_policy
}
