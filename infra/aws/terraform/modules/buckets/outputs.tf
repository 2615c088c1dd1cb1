output "names" {
  description = "Bucket names by short name (data, dvc, mlflow, ray)."
  value       = { for key, bucket in aws_s3_bucket.this : key => bucket.bucket }
}

output "arns" {
  description = "Bucket ARNs by short name."
  value       = { for key, bucket in aws_s3_bucket.this : key => local.arns[key] }
}

output "uris" {
  description = "s3:// URIs by short name, for DVC remotes, MLflow artifact destinations and ray.storage_path."
  value       = { for key, bucket in aws_s3_bucket.this : key => "s3://${bucket.bucket}" }
}
