# An IAM role that one Kubernetes service account assumes through the cluster's OIDC provider (IRSA).
variable "name" {
  description = "The role's name."
  type        = string
}

variable "oidc_issuer" {
  description = "The cluster's OIDC issuer URL."
  type        = string
}

variable "oidc_arn" {
  description = "The IAM OIDC provider's ARN."
  type        = string
}

variable "service_account" {
  description = "namespace:name of the service account allowed to assume the role."
  type        = string
}

variable "policy_arns" {
  description = "Managed policies to attach."
  type        = list(string)
  default     = []
}

variable "inline_policy" {
  description = "An inline policy document (JSON), or empty."
  type        = string
  default     = ""
}

locals {
  issuer = replace(var.oidc_issuer, "https://", "")
}

resource "aws_iam_role" "this" {
  name = var.name
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Federated = var.oidc_arn }
      Action    = "sts:AssumeRoleWithWebIdentity"
      Condition = {
        StringEquals = {
          "${local.issuer}:sub" = "system:serviceaccount:${var.service_account}"
          "${local.issuer}:aud" = "sts.amazonaws.com"
        }
      }
    }]
  })
}

resource "aws_iam_role_policy_attachment" "this" {
  for_each   = toset(var.policy_arns)
  role       = aws_iam_role.this.name
  policy_arn = each.value
}

resource "aws_iam_role_policy" "this" {
  count  = var.inline_policy == "" ? 0 : 1
  name   = "${var.name}-inline"
  role   = aws_iam_role.this.id
  policy = var.inline_policy
}

output "arn" {
  description = "The role's ARN (annotate the service account with eks.amazonaws.com/role-arn)."
  value       = aws_iam_role.this.arn
}
